"""PostgreSQL specifics of the store: the driver (psycopg 3), engine options and the write check.

A shared deployment points every writer and the app at one server::

    precompute run ... --db postgresql+psycopg://user:password@host/tinyscope
    TINYSCOPE_DB=postgresql+psycopg://user:password@host/tinyscope streamlit run app/main.py

The schema is the same as on SQLite (``Base.metadata``); ``db.open_store`` creates it and checks its
version on both. A bare ``postgresql://`` URL is taken to mean psycopg 3, the driver tinyscope
installs (``pip install 'tinyscope[postgres]'``); SQLAlchemy would otherwise pick psycopg2.
"""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from operator import itemgetter

from sqlalchemy import LargeBinary, text
from sqlalchemy.engine import Connection

DRIVER = "psycopg"
INSTALL_HINT = "PostgreSQL needs psycopg 3: pip install 'tinyscope[postgres]' (or psycopg[binary])"


def is_postgres(url: str) -> bool:
    return url.startswith(("postgresql:", "postgresql+", "postgres:"))


def with_driver(url: str) -> str:
    """``postgresql://`` / ``postgres://`` -> ``postgresql+psycopg://``; other URLs unchanged."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return f"postgresql+{DRIVER}://" + url[len(bare) :]
    return url


def _finite(obj):
    # PostgreSQL's json type has no NaN or Infinity (SQLite stores Python's NaN token as text)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def json_dumps(obj) -> str:
    """JSON for a PostgreSQL ``json`` column: non-finite floats become null instead of failing the insert."""
    try:
        return json.dumps(obj, allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), allow_nan=False)


# create_engine() options: a shared server may drop idle connections (restart, idle timeout), and
# the app holds its engine for days, so each checkout pings first.
ENGINE_OPTIONS = dict(pool_pre_ping=True, json_serializer=json_dumps)


# What SQLAlchemy sends for a multi-row ``insert(Table)`` on psycopg: columns, then one placeholder
# per column, some with a type cast (``%(layer)s::INTEGER``, ``%(label)s::VARCHAR(16)``).
_PLACEHOLDER = r"%\(\w+\)s(?:::[A-Z][A-Z0-9_ ]*(?:\(\d+(?:, ?\d+)?\))?)?"
_PLAIN_INSERT = re.compile(rf"INSERT INTO (\S+) \(([^()]*)\) VALUES \(({_PLACEHOLDER}(?:, {_PLACEHOLDER})*)\)")
COPY_MIN_ROWS = 50

_INT_LIMIT = {20: 2**63, 21: 2**15, 23: 2**31}  # int8, int2, int4


@lru_cache(maxsize=1)
def _copy_types() -> dict[int, tuple[type, ...]]:
    """Column type oid -> the Python types binary COPY writes to it exactly as an INSERT would (SQLAlchemy
    hands over blobs as ``Binary`` and JSON as ``Json``). An int must also fit: binary COPY would wrap
    2**40 into an int4 column silently."""
    from psycopg import Binary
    from psycopg.types.json import Json

    return {
        16: (bool,), 20: (int,), 21: (int,), 23: (int,), 700: (float, int), 701: (float, int),
        17: (bytes, Binary), 25: (str,), 1043: (str,), 114: (Json,),
    }


def copy_executemany(cursor, statement: str, parameters, context) -> bool:
    """SQLAlchemy's ``do_executemany`` hook: a plain many-row INSERT is sent as binary ``COPY``.

    Jobs write their rows with ``s.execute(insert(Row), rows)``. psycopg's pipelined executemany
    still runs one INSERT per row, 2-3x SQLite's time for a neuron run; COPY streams the rows, and
    in binary format blobs go as they are, not hex-encoded (the neuron spectra are most of a
    run's bytes). Anything else (RETURNING, ON CONFLICT, SQL expressions, few rows, a value COPY
    would not write as an INSERT does) goes the usual way: returns False.
    """
    if len(parameters) < COPY_MIN_ROWS or not isinstance(parameters[0], dict):
        return False
    m = _PLAIN_INSERT.fullmatch(statement)
    if m is None:
        return False
    table, columns = m.group(1), m.group(2)
    names = re.findall(r"%\((\w+)\)s", m.group(3))
    oids = _column_types(cursor, context, table, [c.strip().strip('"') for c in columns.split(",")])
    if oids is None or len(oids) != len(names):
        return False
    if len(names) < 2:
        return False
    row_of = itemgetter(*names)
    rows = [row_of(p) for p in parameters]
    if not _copyable(rows, oids):
        return False
    with cursor.copy(f"COPY {table} ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types(oids)
        for row in rows:
            copy.write_row(row)
    return True


def _column_types(cursor, context, table: str, columns: list[str]) -> list[int] | None:
    """The type oid of each column (from the catalog, once per table and connection)."""
    cache = context.root_connection.info.setdefault("tinyscope_column_types", {})
    if table not in cache:
        cursor.execute(
            "SELECT attname, atttypid::int FROM pg_attribute"
            " WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
            (table,),
        )
        cache[table] = dict(cursor.fetchall())
    oids = [cache[table].get(c) for c in columns]
    return None if None in oids else oids


def _copyable(rows: list[tuple], oids: list[int]) -> bool:
    for i, oid in enumerate(oids):
        kinds = _copy_types().get(oid)
        if kinds is None:
            return False
        values = [r[i] for r in rows if r[i] is not None]
        if any(type(v) not in kinds for v in values):
            return False
        limit = _INT_LIMIT.get(oid)
        if limit is not None and values and (min(values) < -limit or max(values) >= limit):
            return False
    return True


def store_blobs_uncompressed(conn: Connection, tables) -> None:
    """New tables keep their blobs uncompressed (``STORAGE EXTERNAL``), as SQLite does. PostgreSQL
    would compress every value over 2 kB (pglz); float arrays hardly shrink and a neuron run's
    spectra then take longer to compress than to write."""
    quote = conn.dialect.identifier_preparer.quote
    for table in tables:
        for col in table.columns:
            if isinstance(col.type, LargeBinary):
                conn.execute(text(f"ALTER TABLE {quote(table.name)} ALTER COLUMN {quote(col.name)} SET STORAGE EXTERNAL"))


def check_write_transaction(conn: Connection, tables: list[str], timeout_s: float) -> str | None:
    """Open a write transaction and take the lock an INSERT takes on every table (rolled back).

    Returns why the database cannot be written (one line) or None. ``ROW EXCLUSIVE`` conflicts with
    no reader and no other writer, only with DDL and explicit table locks; it needs a write
    privilege on each table, so a user who may only read is caught here too.
    """
    trans = conn.begin()
    try:
        if conn.execute(text("SHOW transaction_read_only")).scalar() == "on":
            return "the server only allows read-only transactions (a standby, or default_transaction_read_only)"
        conn.execute(text(f"SET LOCAL lock_timeout = {max(1, int(timeout_s * 1000))}"))
        names = ", ".join(conn.dialect.identifier_preparer.quote(t) for t in tables)
        conn.execute(text(f"LOCK TABLE {names} IN ROW EXCLUSIVE MODE"))
        return None
    finally:
        trans.rollback()
