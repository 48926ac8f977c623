"""The store on PostgreSQL (psycopg 3) against a real local server (tests/pg_server.py), next to SQLite.

Where psycopg or Debian's postgresql is absent the PostgreSQL cases skip with the reason; the
SQLite halves of the parametrised tests still run.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, inspect, select, text, update
from sqlalchemy.pool import NullPool

from conftest import ROOT

_N_DB = iter(range(1_000_000))


def _assert_one_line(e: BaseException) -> str:
    msg = str(e)
    assert msg and "\n" not in msg and "Traceback" not in msg, msg
    return msg


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path) -> str:
    """An empty database of each dialect (a new one per test)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'store.db'}"
    server = request.getfixturevalue("pg_server")
    return server.create_database(f"t{next(_N_DB)}")


def test_two_writers_registering_one_model_share_its_row(empty_url, lm260k):
    """Two runs of a new model into one database at the same moment: the second writer's insert
    waits for the first one's commit (PostgreSQL) and then uses its row, with no unique-name error."""
    import threading

    from precompute.store.db import open_store, upsert_model
    from precompute.store.tables import ModelRow

    store = open_store(empty_url)
    try:
        first = store.session()
        first.begin()
        a = upsert_model(first, lm260k)  # inserted, not committed yet
        got: dict = {}

        def second():
            try:
                with store.session() as s, s.begin():
                    got["id"] = upsert_model(s, lm260k).id
            except BaseException as e:  # noqa: BLE001 - reported below
                got["error"] = e

        t = threading.Thread(target=second)
        t.start()
        t.join(1.0 if store.engine.dialect.name == "postgresql" else 0)  # PostgreSQL: it waits on the row
        first.commit()
        a_id = a.id
        first.close()
        t.join(30)
        assert "error" not in got, got.get("error")
        assert got["id"] == a_id
        with store.session() as s:
            assert len(s.scalars(select(ModelRow)).all()) == 1
    finally:
        store.engine.dispose()


# ---------------------------------------------------------------------------------------------
# schema and version check


def test_open_store_creates_the_schema_on_postgres(pg_server):
    from precompute.store.base import SCHEMA_VERSION, Base
    from precompute.store.db import open_store
    from precompute.store.tables import MetaRow

    store = open_store(pg_server.create_database("schema"))
    try:
        assert store.engine.dialect.name == "postgresql" and store.engine.dialect.driver == "psycopg"
        insp = inspect(store.engine)
        assert set(insp.get_table_names()) == set(Base.metadata.tables)
        cols = {c["name"]: str(c["type"]) for c in insp.get_columns("models")}
        assert cols["n_params"] == "BIGINT" and cols["vocab"] == "JSON"
        assert {str(c["type"]) for c in insp.get_columns("sequences") if c["name"] == "token_ids"} == {"BYTEA"}
        with store.session() as s:
            assert s.scalar(select(MetaRow.value).where(MetaRow.key == "schema_version")) == str(SCHEMA_VERSION)
            storage = s.execute(text("SELECT attstorage FROM pg_attribute WHERE attrelid = 'sequences'::regclass "
                                     "AND attname = 'token_ids'")).scalar()
            assert storage == "e"  # blobs stored uncompressed, as on SQLite
    finally:
        store.engine.dispose()
    again = open_store(store.url)  # opening an initialised database again changes nothing
    again.engine.dispose()


def test_other_schema_version_is_refused_in_one_line(empty_url):
    from precompute.store.db import StoreError, open_store
    from precompute.store.tables import MetaRow

    store = open_store(empty_url)
    with store.engine.begin() as conn:
        conn.execute(update(MetaRow).where(MetaRow.key == "schema_version").values(value="999"))
    store.engine.dispose()
    for create in (True, False):
        with pytest.raises(StoreError) as e:
            open_store(empty_url, create=create)
        assert "schema version 999" in _assert_one_line(e.value)


def test_foreign_database_is_refused_in_one_line(empty_url):
    from precompute.store.db import StoreError, open_store

    engine = create_engine(empty_url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE invoices (id INTEGER PRIMARY KEY, amount FLOAT)"))
    engine.dispose()
    with pytest.raises(StoreError) as e:
        open_store(empty_url)
    assert "is not a tinyscope database" in _assert_one_line(e.value)
    engine = create_engine(empty_url)
    with engine.connect() as conn:
        assert inspect(conn).get_table_names() == ["invoices"]  # nothing was created beside it
    engine.dispose()


def test_empty_database_is_not_served(empty_url):
    from precompute.store.db import StoreError, open_store

    if empty_url.startswith("sqlite"):
        Path(empty_url[len("sqlite:///") :]).touch()
    with pytest.raises(StoreError) as e:
        open_store(empty_url, create=False)
    assert "no tinyscope data yet" in _assert_one_line(e.value)


def test_unreachable_server_is_one_line_without_the_password():
    from precompute.store.db import StoreError, open_store

    with pytest.raises(StoreError) as e:
        open_store("postgresql://tiny:s3cret@127.0.0.1:1/tinyscope")  # bare postgresql:// means psycopg 3
    msg = _assert_one_line(e.value)
    assert "s3cret" not in msg and "127.0.0.1" in msg


# ---------------------------------------------------------------------------------------------
# check_writable: locked and read-only databases fail early, in one line


def _hold_write_lock(url: str):
    """Another client holding the write lock: a SQLite RESERVED lock, a PostgreSQL table lock."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url[len("sqlite:///") :], isolation_level=None)
        conn.execute("BEGIN IMMEDIATE")
        return conn
    conn = create_engine(url, poolclass=NullPool).raw_connection()
    conn.cursor().execute("LOCK TABLE runs IN ACCESS EXCLUSIVE MODE")  # what a DROP or ALTER of the table takes
    return conn


def test_locked_database_fails_early_in_one_line(empty_url):
    from precompute.store.db import StoreError, check_writable, open_store

    store = open_store(empty_url)
    check_writable(store)
    holder = _hold_write_lock(empty_url)
    try:
        t0 = time.monotonic()
        with pytest.raises(StoreError) as e:
            check_writable(store, timeout_s=0.5)
        assert time.monotonic() - t0 < 5, "the wait for the lock is bounded by timeout_s"
        assert "locked by another process" in _assert_one_line(e.value)
    finally:
        holder.rollback()
        holder.close()
    check_writable(store)  # free again
    store.engine.dispose()


def test_read_only_postgres_database_fails_early(pg_server):
    from precompute.store.db import StoreError, check_writable, open_store

    url = pg_server.create_database("readonly")
    open_store(url).engine.dispose()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("ALTER DATABASE readonly SET default_transaction_read_only = on"))
    engine.dispose()
    store = open_store(url)  # readers are welcome
    with pytest.raises(StoreError) as e:
        check_writable(store)
    assert "read-only" in _assert_one_line(e.value)
    store.engine.dispose()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write any file; permissions cannot make it read-only")
def test_read_only_sqlite_file_fails_early(tmp_path):
    from precompute.store.db import StoreError, check_writable, open_store

    url = f"sqlite:///{tmp_path / 'ro.db'}"
    open_store(url).engine.dispose()
    (tmp_path / "ro.db").chmod(0o444)
    store = open_store(url)
    with pytest.raises(StoreError) as e:
        check_writable(store)
    assert "read-only" in _assert_one_line(e.value)
    store.engine.dispose()


# ---------------------------------------------------------------------------------------------
# bulk writes: many-row inserts go through binary COPY, with an INSERT's results


def test_bulk_insert_is_copied_with_insert_semantics(pg_server, monkeypatch):
    from sqlalchemy import JSON, Column, Float, Integer, LargeBinary, MetaData, String, Table
    from sqlalchemy.exc import DBAPIError

    from precompute.store import pg
    from precompute.store.db import open_store

    copied = []
    real = pg._copyable
    monkeypatch.setattr(pg, "_copyable", lambda rows, oids: copied.append(real(rows, oids)) or copied[-1])
    store = open_store(pg_server.create_database("bulk"))
    md = MetaData()
    t = Table("bulk", md, Column("id", Integer, primary_key=True), Column("n", Integer), Column("x", Float),
              Column("label", String(16)), Column("blob", LargeBinary), Column("doc", JSON))
    md.create_all(store.engine)
    rows = [dict(n=i, x=i / 3, label=f"r{i}", blob=bytes([i % 256]) * i, doc={"i": i, "v": [0.5, float("nan")]})
            for i in range(200)]
    with store.engine.begin() as conn:
        conn.execute(t.insert(), rows)
    assert copied == [True]
    with store.engine.connect() as conn:
        back = [r._asdict() for r in conn.execute(select(t).order_by(t.c.id))]
    assert [(r["n"], r["x"], r["label"], r["blob"]) for r in back] == [(r["n"], r["x"], r["label"], r["blob"]) for r in rows]
    assert back[7]["doc"] == {"i": 7, "v": [0.5, None]}  # PostgreSQL's json has no NaN: stored as null
    # values binary COPY would write differently from an INSERT take the INSERT path
    with store.engine.begin() as conn:
        conn.execute(t.insert(), [dict(r, n=float(r["n"])) for r in rows])  # an INSERT casts 3.0 to 3
    assert copied[-1] is False
    with pytest.raises(DBAPIError, match="out of range"):  # never wrapped silently
        with store.engine.begin() as conn:
            conn.execute(t.insert(), [dict(r, n=2**40) for r in rows])
    store.engine.dispose()


# ---------------------------------------------------------------------------------------------
# the same data on both: rows copied from a SQLite neuron run read back identically


def _copy_rows(src_url: str, dst_url: str) -> None:
    """Every row of every table, in foreign-key order, through the store's bulk insert path."""
    from precompute.store.base import Base
    from precompute.store.db import open_store

    src, dst = open_store(src_url, create=False), open_store(dst_url)
    with src.engine.connect() as a, dst.engine.begin() as b:
        for table in Base.metadata.sorted_tables:
            if table.name == "tinyscope_meta":
                continue
            rows = [dict(r._mapping) for r in a.execute(select(table))]
            if rows:
                b.execute(table.insert(), rows)
    src.engine.dispose()
    dst.engine.dispose()


def test_neuron_pages_are_identical_on_postgres(neurons_db, pg_server, stories260k_path):
    from precompute.jobs.neurons.tables import layer_neurons, neuron_page
    from precompute.store.base import Base
    from precompute.store.db import open_store
    from precompute.store.queries import get_model, list_runs

    pg = pg_server.create_database("copied")
    _copy_rows(neurons_db, pg)
    lite, post = open_store(neurons_db, create=False), open_store(pg, create=False)
    with lite.session() as a, post.session() as b:
        for table in Base.metadata.sorted_tables:  # every value round-trips: blobs, JSON, floats, times
            q = select(table).order_by(*table.primary_key.columns)
            assert [tuple(r) for r in a.execute(q)] == [tuple(r) for r in b.execute(q)], table.name
        assert list_runs(a) == list_runs(b)
        info = get_model(a, "stories260K")
        assert get_model(b, str(stories260k_path)) == info  # the folder's path finds its model
        for layer in range(info.n_layers):
            assert layer_neurons(a, "stories260K", layer) == layer_neurons(b, "stories260K", layer)
            for neuron in (0, 7, info.d_mlp - 1):
                assert neuron_page(a, "stories260K", layer, neuron) == neuron_page(b, "stories260K", layer, neuron)
    lite.engine.dispose()
    post.engine.dispose()


# ---------------------------------------------------------------------------------------------
# the command line: one run into each database, `show` returns the same


def _show(capsys, args: list[str]) -> dict:
    from precompute.cli import main

    capsys.readouterr()
    assert main(args) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def _without_run_times(page: dict) -> dict:
    run = page.get("run")
    if isinstance(run, dict):
        page = dict(page, run={k: v for k, v in run.items() if k not in ("started_at", "finished_at", "code_version", "id")})
    return page


def test_run_and_show_on_postgres_match_sqlite(capsys, monkeypatch, tmp_path, pg_server, stories260k_path, valid_corpus):
    from precompute.cli import main
    from precompute.store.db import open_store
    from precompute.store.queries import get_model

    monkeypatch.chdir(ROOT)
    model = os.path.relpath(stories260k_path, ROOT)  # as typed: a relative path
    urls = {"sqlite": f"sqlite:///{tmp_path / 'run.db'}", "postgresql": pg_server.create_database("cli")}
    pages = {}
    for kind, url in urls.items():
        args = ["run", "--model", model, "--corpus", str(valid_corpus), "--jobs", "neurons,heads",
                "--max-tokens", "3000", "--db", url]
        assert main(args) == 0, capsys.readouterr().err
        with open_store(url, create=False).session() as s:
            assert get_model(s, "stories260K").source == str(stories260k_path.resolve())  # stored absolute
        pages[kind] = [
            _show(capsys, ["show", "neuron", "--model", name, "--layer", str(layer), "--neuron", "5", "--db", url, "--json"])
            for name, layer in (("stories260K", 0), (model, 2), (str(stories260k_path), 4))  # a path finds the model
        ]
        pages[kind].append(_show(capsys, ["show", "heads", "--model", "stories260K", "--db", url, "--json"]))
    for a, b in zip(pages["sqlite"], pages["postgresql"]):
        assert _without_run_times(a) == _without_run_times(b)
