"""The one place that makes engines and sessions, checks the schema and writes core rows.

Data functions take a session and never commit; the caller owns the transaction::

    store = open_store("sqlite:///data/tinyscope.db")
    with store.session.begin() as s:
        write_run(s, ...)
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

import numpy as np
from sqlalchemy import create_engine, event, inspect, select, text
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from .. import __version__
from ..errors import one_line
from . import pg
from .base import SCHEMA_VERSION, Base, to_blob
from .tables import MetaRow, ModelRow, RunRow, SequenceRow

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DB = f"sqlite:///{REPO_ROOT / 'data' / 'tinyscope.db'}"


class StoreError(RuntimeError):
    """A database that cannot be used; the message is one line for the user."""


def _import_table_modules() -> None:
    # every job declares its tables in its own package (precompute/jobs/NAME/tables.py); they
    # register on Base.metadata when imported. Imported here, lazily, so that the schema is
    # complete whoever opens the store; the job packages import the store, never the reverse
    # at import time.
    from ..jobs import register_tables

    register_tables()


@dataclass
class Store:
    url: str
    engine: Engine
    session: sessionmaker[Session]


SQLITE_BUSY_MS = 5000  # how long a statement waits for another connection's lock


def _sqlite_pragmas(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
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


def shown_url(url: str) -> str:
    """The URL as messages show it: a password in it is masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def _sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory ones)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
        return Path(url[len("sqlite:///") :].split("?", 1)[0])
    return None


def _engine(url: str) -> Engine:
    try:
        engine = create_engine(url, **(pg.ENGINE_OPTIONS if pg.is_postgres(url) else {}))
    except ModuleNotFoundError as e:
        hint = pg.INSTALL_HINT if pg.is_postgres(url) else f"the driver is not installed ({e})"
        raise StoreError(f"cannot open database {shown_url(url)}: {hint}") from None
    except Exception as e:  # noqa: BLE001 - a malformed URL or an unknown dialect
        raise StoreError(f"cannot open database {shown_url(url)!r}: {one_line(e)}") from None
    if engine.dialect.name == "sqlite":
        _sqlite_pragmas(engine)
    elif engine.dialect.name == "postgresql":
        event.listen(engine, "do_executemany", pg.copy_executemany)
    return engine


def open_store(url: str | None = None, create: bool = True) -> Store:
    """Open (and with ``create``, initialise) a database; refuse foreign or other-version ones.

    A writer calls ``check_writable`` next, so a locked or read-only database fails before the work.
    """
    url = pg.with_driver(url or DEFAULT_DB)
    shown = shown_url(url)
    _import_table_modules()
    path = _sqlite_path(url)
    if path is not None:
        if not path.exists() and not create:
            raise StoreError(f"no database at {path}; build it with `precompute run`")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"cannot create the folder of {path}: {one_line(e)}") from None
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
            if names and MetaRow.__tablename__ not in names:
                raise StoreError(f"{shown} is not a tinyscope database (it has other tables); use another --db")
            if MetaRow.__tablename__ in names:
                row = conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).scalar()
                if row is None or not str(row).isdigit() or int(row) != SCHEMA_VERSION:
                    raise StoreError(
                        f"{shown} has schema version {row}, this tinyscope needs {SCHEMA_VERSION}; "
                        "rebuild it with `precompute run` into a new --db"
                    )
            elif not create:
                raise StoreError(f"{shown} has no tinyscope data yet; build it with `precompute run --db ...`")
        if create:
            with engine.begin() as conn:
                if engine.dialect.name == "postgresql":
                    # writers starting together on a new database: one creates the tables, the rest wait
                    conn.execute(text("SELECT pg_advisory_xact_lock(7411)"))
                existing = set(inspect(conn).get_table_names())
                Base.metadata.create_all(conn)
                if engine.dialect.name == "postgresql":
                    pg.store_blobs_uncompressed(conn, [t for t in Base.metadata.sorted_tables if t.name not in existing])
                if conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).scalar() is None:
                    conn.execute(MetaRow.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
    except StoreError:
        engine.dispose()
        raise
    except DatabaseError as e:
        engine.dispose()
        if engine.dialect.name == "sqlite" and not isinstance(e, OperationalError):
            raise StoreError(f"{shown} is not a readable database: {describe_db_error(e)}") from None
        raise StoreError(f"database {shown} cannot be used: {describe_db_error(e)}") from None
    return Store(url=url, engine=engine, session=sessionmaker(engine, expire_on_commit=False))


def check_writable(store: Store, timeout_s: float = 5.0) -> None:
    """Raise StoreError (one line) unless a write transaction can be had within ``timeout_s``.

    SQLite: the file (or, for a new one, its folder) and the folder (journal files live there) are
    writable, and ``BEGIN IMMEDIATE`` (the write lock) succeeds. PostgreSQL: the session is not
    read-only and every table takes the lock an INSERT takes. Nothing is written either way.
    """
    shown = shown_url(store.url)
    path = _sqlite_path(store.url)
    if path is not None:
        for target, what in ((path, "file"), (path.parent, "folder")):
            if target.exists() and not os.access(target, os.W_OK):
                raise StoreError(f"database {shown} cannot be written: its {what} {target} is read-only for this user")
    try:
        if store.engine.dialect.name == "postgresql":
            with store.engine.connect() as conn:
                why = pg.check_write_transaction(conn, sorted(Base.metadata.tables), timeout_s)
            if why:
                raise StoreError(f"database {shown} cannot be written: {why}")
        elif store.engine.dialect.name == "sqlite":
            raw = store.engine.raw_connection()
            try:
                cur = raw.cursor()
                cur.execute(f"PRAGMA busy_timeout={max(1, int(timeout_s * 1000))}")
                try:
                    cur.execute("BEGIN IMMEDIATE")
                    cur.execute("ROLLBACK")
                finally:
                    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
                    cur.close()
            finally:
                raw.close()
    except (DBAPIError, store.engine.dialect.loaded_dbapi.Error) as e:  # a raw connection's come unwrapped
        raise StoreError(f"database {shown} cannot be written: {describe_db_error(e)}") from None


@lru_cache(maxsize=8)
def cached_store(url: str) -> Store:
    """A read-only handle shared within a process (the app and `show`)."""
    return open_readonly(url)


def describe_db_error(e: Exception) -> str:
    """One line for a database error; locks and read-only databases get a plain explanation."""
    msg = one_line(getattr(e, "orig", None) or e)
    low = msg.lower()
    if "locked" in low or "lock timeout" in low or "could not obtain lock" in low:
        return "the database is locked by another process (a job still writing?); try again when it finishes"
    if "readonly database" in low or "read-only" in low:
        return "the database is read-only (check the permissions of the file and its folder, or the server's settings)"
    if "unable to open database file" in low:
        return "the database file cannot be opened (does its folder exist, and may this user write there?)"
    return msg


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


def upsert_model(s: Session, lm) -> ModelRow:
    """The ``models`` row for a loaded model (by short name), created on first use."""
    from ..models import model_name

    name = model_name(lm.model_id)
    row = s.scalar(select(ModelRow).where(ModelRow.name == name))
    folder = Path(lm.model_id)
    # a local folder is stored as an absolute path, so the app and `show` find it from any working
    # directory; a hub id is kept as typed
    source = str(folder.resolve()) if folder.is_dir() else str(lm.model_id)
    card_file = folder / "README.md"
    card = card_file.read_text(errors="replace") if card_file.exists() else ""
    fields = dict(
        source=source,
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
        try:
            with s.begin_nested():  # another writer may register the same model at this moment
                row = ModelRow(name=name, **fields)
                s.add(row)
        except IntegrityError:  # it did (PostgreSQL let this insert wait for its commit): use its row
            row = s.scalar(select(ModelRow).where(ModelRow.name == name))
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

# ---------------------------------------------------------------------------------------------
# read-only handles (the app serves pages from one; `precompute show` too).
# A SQLite file is opened through SQLite's URI form with ``mode=ro`` and every connection sets
# ``PRAGMA query_only``: no page can change the database, and none is created where there is
# none. The checks are ``open_store``'s. A PostgreSQL database is opened with
# ``open_store(create=False)`` and every session is set read-only.


def open_readonly(url: str | None = None) -> Store:
    """A ``Store`` whose connections can only read; ``store.url`` is ``url`` as given."""
    url = url or DEFAULT_DB
    path = _sqlite_path(url)
    if path is None:
        return _read_only_server(open_store(url, create=False))
    _import_table_modules()
    shown = shown_url(url)
    path = path.resolve()
    if not path.is_file():
        raise StoreError(f"no database at {path}; build it with `precompute run`")
    ro = URL.create("sqlite", database=f"file:{quote(str(path), safe='/')}", query={"mode": "ro", "uri": "true"})
    engine = create_engine(ro)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn, _record):
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA query_only=ON")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
        cur.close()

    try:
        with engine.connect() as conn:
            names = set(inspect(conn).get_table_names())
            if not names:
                raise StoreError(f"{shown} has no tinyscope data yet; build it with `precompute run --db ...`")
            if MetaRow.__tablename__ not in names:
                raise StoreError(f"{shown} is not a tinyscope database (it has other tables); use another --db")
            row = conn.execute(select(MetaRow.value).where(MetaRow.key == "schema_version")).scalar()
            if row is None or not str(row).isdigit() or int(row) != SCHEMA_VERSION:
                raise StoreError(
                    f"{shown} has schema version {row}, this tinyscope needs {SCHEMA_VERSION}; "
                    "rebuild it with `precompute run` into a new --db"
                )
    except StoreError:
        engine.dispose()
        raise
    except OperationalError as e:
        engine.dispose()
        raise StoreError(f"database {shown} cannot be used: {describe_db_error(e)}") from None
    except DatabaseError as e:
        engine.dispose()
        raise StoreError(f"{shown} is not a readable database: {describe_db_error(e)}") from None
    return Store(url=url, engine=engine, session=sessionmaker(engine, expire_on_commit=False))


def _read_only_server(store: Store) -> Store:
    """Every new connection of a database server's engine starts read-only sessions."""
    if store.engine.dialect.name == "postgresql":

        @event.listens_for(store.engine, "connect")
        def _on_connect(dbapi_conn, _record):
            cur = dbapi_conn.cursor()
            cur.execute("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
            cur.close()
            dbapi_conn.commit()

        store.engine.dispose()  # connections made before the listener are dropped
    return store
