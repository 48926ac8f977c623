"""The one place that makes engines and sessions, checks the schema and writes core rows.

Data functions take a session and never commit; the caller owns the transaction::

    store = open_store("sqlite:///data/tinyscope.db")
    with store.session.begin() as s:
        write_run(s, ...)
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path

import numpy as np
from sqlalchemy import create_engine, event, inspect, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DatabaseError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .. import __version__
from ..errors import one_line
from .base import SCHEMA_VERSION, Base, to_blob
from .tables import MetaRow, ModelRow, RunRow, SequenceRow

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DB = f"sqlite:///{REPO_ROOT / 'data' / 'tinyscope.db'}"


class StoreError(RuntimeError):
    """A database that cannot be used; the message is one line for the user."""


def _import_table_modules() -> None:
    # every module that declares tables registers them on Base.metadata when imported
    from . import neurons  # noqa: F401
    from . import embeddings_tables  # noqa: F401
    from . import heads_tables  # noqa: F401
    from . import rules_tables  # noqa: F401


@dataclass
class Store:
    url: str
    engine: Engine
    session: sessionmaker[Session]


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=5000")
        cur.close()


def code_version() -> str:
    try:
        sha = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def open_store(url: str | None = None, create: bool = True) -> Store:
    """Open (and with ``create``, initialise) a database; refuse foreign or other-version ones."""
    url = url or DEFAULT_DB
    _import_table_modules()
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        path = Path(url[len("sqlite:///") :])
        if not path.exists() and not create:
            raise StoreError(f"no database at {path}; build it with `precompute run`")
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        engine = create_engine(url)
    except Exception as e:  # noqa: BLE001 - a malformed URL or a missing driver
        raise StoreError(f"cannot open database {url!r}: {e}") from None
    if engine.dialect.name == "sqlite":
        _sqlite_pragmas(engine)
    try:
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
            if names and MetaRow.__tablename__ not in names:
                raise StoreError(f"{url} is not a tinyscope database (it has other tables); use another --db")
            if MetaRow.__tablename__ in names:
                row = conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).scalar()
                if row is None or int(row) != SCHEMA_VERSION:
                    raise StoreError(
                        f"{url} has schema version {row}, this tinyscope needs {SCHEMA_VERSION}; "
                        "rebuild it with `precompute run` into a new --db"
                    )
        if create:
            Base.metadata.create_all(engine)
            with engine.begin() as conn:
                if conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).scalar() is None:
                    conn.execute(MetaRow.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
    except StoreError:
        engine.dispose()
        raise
    except OperationalError as e:
        engine.dispose()
        raise StoreError(f"database {url} cannot be used: {describe_db_error(e)}") from None
    except DatabaseError as e:
        engine.dispose()
        raise StoreError(f"{url} is not a readable database: {describe_db_error(e)}") from None
    return Store(url=url, engine=engine, session=sessionmaker(engine, expire_on_commit=False))


@lru_cache(maxsize=8)
def cached_store(url: str) -> Store:
    """A read-only handle shared within a process (the app and `show`)."""
    return open_store(url, create=False)


def describe_db_error(e: Exception) -> str:
    msg = one_line(getattr(e, "orig", None) or e)
    if "locked" in msg:
        return "the database is locked by another process (a job still writing?); try again when it finishes"
    return msg


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def upsert_model(s: Session, lm) -> ModelRow:
    """The ``models`` row for a loaded model (by short name), created on first use."""
    from ..models import model_name

    name = model_name(lm.model_id)
    row = s.scalar(select(ModelRow).where(ModelRow.name == name))
    card_file = Path(lm.model_id) / "README.md"
    card = card_file.read_text(errors="replace") if card_file.exists() else ""
    fields = dict(
        source=str(lm.model_id),
        architecture=lm.architecture,
        n_layers=lm.n_layers,
        n_heads=lm.n_heads,
        d_model=lm.d_model,
        d_mlp=lm.d_mlp,
        vocab_size=lm.vocab_size,
        n_ctx=lm.n_ctx,
        n_params=lm.n_params,
        bos_id=lm.bos_id,
        special_ids=sorted(lm.special_ids),
        vocab=lm.display_vocab(),
        card=card,
    )
    if row is None:
        row = ModelRow(name=name, **fields)
        s.add(row)
    else:
        for k, v in fields.items():
            setattr(row, k, v)
    s.flush()
    return row


def write_run(s: Session, lm, job: str, seqs, params: dict, started_at: datetime, summary: dict | None = None) -> RunRow:
    """A complete run row and its sequences; the caller adds the job's rows in the same transaction."""
    model = upsert_model(s, lm)
    run = RunRow(
        model_id=model.id,
        job=job,
        corpus=seqs.corpus_name,
        corpus_synthetic=seqs.synthetic,
        n_tokens=seqs.n_scored,
        n_sequences=len(seqs.ids),
        prepend_bos=seqs.prepend_bos,
        params=params,
        code_version=code_version(),
        started_at=started_at,
        finished_at=now(),
        status="complete",
        summary=summary or {},
    )
    s.add(run)
    s.flush()
    s.execute(
        SequenceRow.__table__.insert(),
        [
            dict(run_id=run.id, seq_idx=i, story_id=int(sid), offset=int(off), token_ids=to_blob(np.asarray(ids, np.int32)))
            for i, (sid, off, ids) in enumerate(zip(seqs.story_ids, seqs.offsets, seqs.ids))
        ],
    )
    return run
