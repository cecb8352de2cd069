"""Database engine factory: a SQLite file by default, PostgreSQL (or any SQLAlchemy URL) by URL."""

from __future__ import annotations

import contextlib
import json
import threading
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import ARRAY, ColumnElement, any_, bindparam, event, func, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.sql.elements import BindParameter
from sqlmodel import Session, create_engine


def make_engine(url: str) -> Engine:
    """An engine for `url`, tuned so several local processes can share one SQLite file."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            # WAL lets readers and one writer work at once across processes.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            # In WAL mode NORMAL never corrupts the database and keeps every commit but the
            # last ones across a power cut (not across a process crash): fsync per checkpoint
            # instead of per commit.
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    # Small pools: a server runs five processes, and PostgreSQL's default limit is 100.
    return create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=6)


def create_tables(engine: Engine) -> None:
    """Bring the database to the newest schema revision: create a new one, record one of the
    last release before migrations, upgrade an older one (ferrylink.schema.upgrade_schema,
    safe when many processes start at once). What tests and tools call for a ready database;
    services check the revision at start with ferrylink.schema.prepare_schema instead."""
    from ferrylink.schema import upgrade_schema

    upgrade_schema(engine)


def database_works(engine: Engine) -> bool:
    try:
        with Session(engine) as session:
            session.exec(text("SELECT 1"))  # type: ignore[call-overload]
        return True
    except Exception:
        return False


# -- a list of values as one bound parameter ----------------------------------------------------
# SQLAlchemy renders `IN (..)` anew for each list (an "expanding" parameter: ~0.4 ms for 64
# values, on every batch of events). As one parameter - a JSON array read by json_each on
# SQLite, an array on PostgreSQL - the statement is compiled once and cached.


def one_of(column: ColumnElement[Any], values: Sequence[Any], dialect: str) -> ColumnElement[bool]:
    """`column IN values`, the values bound as one parameter (Core statements)."""
    if dialect == "postgresql":
        return column == any_(bindparam(None, list(values), type_=ARRAY(column.type)))
    return _in_json_array(column, bindparam(None, json.dumps(list(values))))


def one_of_param(column: ColumnElement[Any], name: str, dialect: str) -> ColumnElement[bool]:
    """`column IN :name` for a Core statement built once and run many times (building one
    with `one_of` costs ~0.1 ms); the values bound by `one_of_value`."""
    if dialect == "postgresql":
        return column == any_(bindparam(name, type_=ARRAY(column.type)))
    return _in_json_array(column, bindparam(name))


def _in_json_array(column: ColumnElement[Any], array: BindParameter[Any]) -> ColumnElement[bool]:
    table = func.json_each(array).table_valued("value")
    return column.in_(select(table.c.value))


def one_of_sql(name: str, dialect: str) -> str:
    """`IN :name` for `text()` statements, the values bound by `one_of_value`."""
    if dialect == "postgresql":
        return f"= ANY(:{name})"
    return f"IN (SELECT value FROM json_each(:{name}))"


def one_of_value(values: Sequence[Any], dialect: str) -> Any:
    return list(values) if dialect == "postgresql" else json.dumps(list(values))


# -- one writer at a time on SQLite, within a process ---------------------------------------------
# SQLite has one writer. A writer that finds the file locked sleeps in SQLite's busy handler
# (1, 2, 5, 10 ms and more between tries), so two threads of a process that write at once
# lose milliseconds each time; on this lock the next one starts as soon as the first commits.
# Other processes still meet at SQLite's own lock.
_WRITE_LOCKS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()
_WRITE_LOCKS_GUARD = threading.Lock()


def writing(engine: Engine) -> contextlib.AbstractContextManager[Any]:
    """Hold around a write transaction: this process's writers to a SQLite database take
    turns (a no-op on PostgreSQL)."""
    if engine.dialect.name != "sqlite":
        return contextlib.nullcontext()
    with _WRITE_LOCKS_GUARD:
        lock = _WRITE_LOCKS.get(engine)
        if lock is None:
            lock = _WRITE_LOCKS[engine] = threading.Lock()
    return lock
