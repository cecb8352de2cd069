"""`ferrylink db upgrade|current|revision`: the database schema from the command line
(ferrylink.schema does the work; this module phrases it for an operator)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from alembic import command
from sqlalchemy.engine import make_url

from ferrylink.db import make_engine
from ferrylink.schema import (
    SchemaStatus,
    alembic_config,
    schema_state,
    script_directory,
    upgrade_schema,
)


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _missing_sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL when it does not exist (asking must not create it)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    path = Path(parsed.database or "")
    return None if path.exists() else path


def db_current(url: str) -> str:
    """The database's schema revision and what it means, e.g. `0001 (head)`."""
    missing = _missing_sqlite_file(url)
    if missing is not None:
        return f"{_shown(url)}: none (no database file at {missing})"
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            return f"{_shown(url)}: {schema_state(connection).describe()}"
    finally:
        engine.dispose()


def db_upgrade(url: str) -> str:
    """Bring the database to this release's head; raises ferrylink.schema.SchemaError."""
    engine = make_engine(url)
    try:
        before, after = upgrade_schema(engine)
    finally:
        engine.dispose()
    if before.status is SchemaStatus.CURRENT:
        return f"{_shown(url)}: already at {after.describe()}"
    was = {
        SchemaStatus.EMPTY: "an empty database",
        SchemaStatus.LEGACY: "the tables of a release before schema migrations",
    }.get(before.status, str(before.revision))
    return f"{_shown(url)}: upgraded from {was} to {after.describe()}"


def next_revision_id() -> str:
    """Revisions are numbered 0001, 0002, ...: the next number."""
    numbers = [int(r.revision) for r in script_directory().walk_revisions() if r.revision.isdigit()]
    return f"{max(numbers, default=0) + 1:04d}"


def new_revision(message: str, version_dir: Path | None = None) -> Path:
    """A draft revision: what differs between the models and a scratch SQLite database at
    the head, as batch operations (they work on SQLite and PostgreSQL). Written to the
    shipped versions folder (a source checkout) unless `version_dir` is given (it must be
    one of ferrylink.schema.EXTRA_VERSION_LOCATIONS). Review it before committing."""
    with tempfile.TemporaryDirectory() as scratch:
        engine = make_engine(f"sqlite:///{scratch}/scratch.db")
        try:
            upgrade_schema(engine)
            with engine.begin() as connection:
                made = command.revision(
                    alembic_config(connection),
                    message,
                    autogenerate=True,
                    rev_id=next_revision_id(),
                    version_path=str(version_dir) if version_dir else None,
                )
        finally:
            engine.dispose()
    scripts = made if isinstance(made, list) else [made]
    assert scripts and scripts[0] is not None
    return Path(scripts[0].path)
