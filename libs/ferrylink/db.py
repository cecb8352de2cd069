"""Database engine factory: a SQLite file by default, PostgreSQL (or any SQLAlchemy URL) by URL."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import Engine
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
