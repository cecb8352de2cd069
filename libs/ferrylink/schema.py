"""The database schema's version: Alembic migrations (ferrylink/migrations) and what a
process does with a database at start.

Every table change is a revision in `migrations/versions`; the database records the one it
is at in `alembic_version`. `prepare_schema` is what a service runs at start and
`ferrylink db upgrade` runs by hand:

- a new, empty database is brought to the newest revision (the head);
- a database at the head is used as it is;
- a database at an older revision of this release is upgraded only when asked
  (`ferrylink db upgrade`, `ferrylink up`, or FERRYLINK_DATABASE_AUTO_UPGRADE=true);
  otherwise the service refuses to start and says to run `ferrylink db upgrade`;
- a database at a revision this release does not know (a newer release migrated it) is
  refused, always;
- a database created before migrations existed (`create_all`: the tables, no
  `alembic_version`) is recorded as the first revision, BASELINE, when its tables and
  columns are those of that revision, and refused with the differences otherwise.

Several processes may start at once on one database: the decision and the migration happen
under a lock (a PostgreSQL advisory lock, SQLite's write lock) and are made again by
whoever gets it next, so exactly one process migrates and the others find the result.

Alembic is imported only when there is something to do: a service that finds its database
at the head reads the revision with one query and the head from the revision files' source
(`quick_head`), and does not pay Alembic's ten megabytes in each of its processes.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
# The first revision: the schema of the last release without migrations.
BASELINE = "0001"
# Any constant: the PostgreSQL advisory lock that serializes schema changes.
SCHEMA_LOCK_ID = 0x466C6B00
VERSION_TABLE = "alembic_version"
AUTO_UPGRADE_VARIABLE = "FERRYLINK_DATABASE_AUTO_UPGRADE"
# Folders of further revisions besides the shipped ones (tests add test-only revisions).
EXTRA_VERSION_LOCATIONS: list[str] = []


class SchemaError(RuntimeError):
    """The database's schema cannot be used by this release; the message says why and what
    to do."""


class SchemaStatus(StrEnum):
    EMPTY = "empty"  # no Ferrylink table, no revision
    LEGACY = "legacy"  # tables of a release before migrations, no revision
    CURRENT = "current"  # at this release's head
    OLDER = "older"  # at an earlier revision of this release
    UNKNOWN = "unknown"  # at a revision this release does not know


@dataclass(frozen=True)
class SchemaState:
    status: SchemaStatus
    revision: str | None  # what alembic_version holds (None: nothing)
    head: str

    def describe(self) -> str:
        """One line for an operator, e.g. `0001 (head)`."""
        match self.status:
            case SchemaStatus.CURRENT:
                return f"{self.revision} (head)"
            case SchemaStatus.OLDER:
                return (
                    f"{self.revision} (older than this release's head {self.head}: "
                    "run `ferrylink db upgrade`)"
                )
            case SchemaStatus.UNKNOWN:
                return (
                    f"{self.revision} (unknown to this release, whose head is {self.head}: "
                    "a newer release migrated this database)"
                )
            case SchemaStatus.EMPTY:
                return "none (empty database)"
            case SchemaStatus.LEGACY:
                return (
                    "none (tables of a release before schema migrations: `ferrylink db "
                    f"upgrade` records them as {BASELINE})"
                )


def alembic_config(connection: Connection | None = None, url: str | None = None) -> Config:
    """Alembic's configuration, built here (no alembic.ini): the migrations shipped in this
    package, run on `connection` (ours, inside the schema lock) or on `url`."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "newline")
    if EXTRA_VERSION_LOCATIONS:
        locations = [str(MIGRATIONS_DIR / "versions"), *EXTRA_VERSION_LOCATIONS]
        config.set_main_option("version_locations", "\n".join(locations))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    if url is not None:
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def script_directory() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


def version_folders() -> list[Path]:
    return [MIGRATIONS_DIR / "versions", *map(Path, EXTRA_VERSION_LOCATIONS)]


def quick_head() -> str | None:
    """The head read from the revision files' source (their `revision` and `down_revision`
    assignments) without importing Alembic; None unless there is exactly one head."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for folder in version_folders():
        for path in folder.glob("*.py"):
            if path.name == "__init__.py":
                continue
            for node in ast.parse(path.read_text()).body:
                target: ast.expr
                if isinstance(node, ast.AnnAssign) and node.value is not None:
                    target, expression = node.target, node.value
                elif isinstance(node, ast.Assign) and len(node.targets) == 1:
                    target, expression = node.targets[0], node.value
                else:
                    continue
                if not isinstance(target, ast.Name):
                    continue
                if target.id == "revision":
                    revisions.add(ast.literal_eval(expression))
                elif target.id == "down_revision":
                    value = ast.literal_eval(expression) or ()
                    parents.update([value] if isinstance(value, str) else value)
    heads = revisions - parents
    return heads.pop() if len(heads) == 1 else None


def database_revisions(connection: Connection) -> tuple[str, ...]:
    """What alembic_version holds (empty when there is no such table), by plain SQL."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return ()
    rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars()
    return tuple(sorted(rows))


def head_revision() -> str:
    head = script_directory().get_current_head()
    assert head is not None, "no migration revision is shipped"
    return head


def schema_state(connection: Connection) -> SchemaState:
    """Where the database is, read without changing anything."""
    script = script_directory()
    head = script.get_current_head()
    assert head is not None, "no migration revision is shipped"
    known = {rev.revision for rev in script.walk_revisions()}
    heads = database_revisions(connection)
    if not heads:
        names = set(inspect(connection).get_table_names())
        if names & set(baseline_tables()):
            return SchemaState(SchemaStatus.LEGACY, None, head)
        return SchemaState(SchemaStatus.EMPTY, None, head)
    revision = ",".join(heads)
    if any(h not in known for h in heads):
        return SchemaState(SchemaStatus.UNKNOWN, revision, head)
    if heads == (head,):
        return SchemaState(SchemaStatus.CURRENT, revision, head)
    return SchemaState(SchemaStatus.OLDER, revision, head)


def prepare_schema(engine: Engine, *, upgrade: bool) -> SchemaState:
    """Make the database usable by this release, or raise SchemaError saying why not.
    `upgrade`: bring a database at an older revision to the head (otherwise refuse it).
    A new database is always created at the head. Returns the state it leaves."""
    head = quick_head()
    with engine.connect() as connection:
        if head is not None and database_revisions(connection) == (head,):
            # What nearly every start finds: no lock, no Alembic.
            return SchemaState(SchemaStatus.CURRENT, head, head)

    with _schema_lock(engine) as connection:
        # Again under the lock: another process may have just done the work. Checked before
        # Alembic is imported, so that of a server's processes starting together on a new
        # database only the one that creates it pays for Alembic.
        if head is not None and database_revisions(connection) == (head,):
            return SchemaState(SchemaStatus.CURRENT, head, head)
        from alembic import command

        state = schema_state(connection)
        where = engine.url.render_as_string(hide_password=True)
        if state.status is SchemaStatus.UNKNOWN:
            raise SchemaError(
                f"the database {where} is at schema revision {state.revision}, which this "
                f"Ferrylink release does not know (its newest is {state.head}): a newer "
                "release has migrated it. Run that release (or a newer one), or restore the "
                "backup taken before that upgrade; this release will not use a schema it "
                "does not understand."
            )
        if state.status is SchemaStatus.EMPTY:
            command.upgrade(alembic_config(connection), "head")
            return schema_state(connection)
        if state.status is SchemaStatus.LEGACY:
            differences = legacy_differences(connection)
            if differences:
                raise SchemaError(
                    f"the database {where} has Ferrylink tables but no schema revision "
                    f"(no {VERSION_TABLE} table), and they are not the tables of the last "
                    f"release before migrations (revision {BASELINE}): "
                    + "; ".join(differences)
                    + ". Ferrylink cannot tell which schema it has, so it will not record "
                    "or upgrade it: use a database created by that release, or a new one."
                )
            # Exactly the baseline's tables: record that, then treat it like any database
            # at the baseline revision.
            command.stamp(alembic_config(connection), BASELINE)
            state = schema_state(connection)
        if state.status is SchemaStatus.OLDER:
            if not upgrade:
                raise SchemaError(
                    f"the database {where} is at schema revision {state.revision}; this "
                    f"release needs {state.head}. Upgrade it once with `ferrylink db "
                    "upgrade` (FERRYLINK_DATABASE_URL or --database-url) and start the "
                    f"services again, or set {AUTO_UPGRADE_VARIABLE}=true to let a service "
                    "upgrade it at start."
                )
            command.upgrade(alembic_config(connection), "head")
            state = schema_state(connection)
        return state


def upgrade_schema(engine: Engine) -> tuple[SchemaState, SchemaState]:
    """`ferrylink db upgrade`: bring the database to the head (create, record a database of
    the last release before migrations, or upgrade). Returns the state before and after."""
    with engine.connect() as connection:
        before = schema_state(connection)
    return before, prepare_schema(engine, upgrade=True)


@contextmanager
def _schema_lock(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction that no other process's schema lock runs beside; the
    migration commits with it (both databases have transactional DDL)."""
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": SCHEMA_LOCK_ID})
        elif engine.dialect.name == "sqlite":
            # The database's write lock until commit (others wait: busy_timeout).
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        yield connection


def baseline_tables() -> dict[str, dict[str, bool]]:
    """The BASELINE revision's tables: {table: {column: nullable}}, read from a scratch
    in-memory SQLite database that revision was run on."""
    global _BASELINE_TABLES
    if _BASELINE_TABLES is None:
        from alembic import command

        scratch = create_engine("sqlite://")
        try:
            with scratch.begin() as connection:
                command.upgrade(alembic_config(connection), BASELINE)
                _BASELINE_TABLES = _tables(connection)
        finally:
            scratch.dispose()
    return _BASELINE_TABLES


_BASELINE_TABLES: dict[str, dict[str, bool]] | None = None


def _tables(connection: Connection, names: set[str] | None = None) -> dict[str, dict[str, bool]]:
    """{table: {column: nullable}} of the named tables (default: all but Alembic's)."""
    inspector = inspect(connection)
    if names is None:
        names = set(inspector.get_table_names()) - {VERSION_TABLE}
    return {
        table: {c["name"]: bool(c["nullable"]) for c in inspector.get_columns(table)}
        for table in names
    }


def legacy_differences(connection: Connection) -> list[str]:
    """How the database's tables differ from the baseline's (table and column names,
    nullability); empty when they are the same. Other tables are not Ferrylink's and are
    left alone."""
    expected = baseline_tables()
    names = set(inspect(connection).get_table_names())
    found = _tables(connection, names & set(expected))
    differences = []
    missing = sorted(set(expected) - names)
    if missing:
        differences.append("missing tables " + ", ".join(missing))
    for table in sorted(found):
        want, have = expected[table], found[table]
        if set(want) - set(have):
            differences.append(f"{table} lacks columns " + ", ".join(sorted(set(want) - set(have))))
        if set(have) - set(want):
            differences.append(
                f"{table} has unexpected columns " + ", ".join(sorted(set(have) - set(want)))
            )
        nullability = sorted(c for c in set(want) & set(have) if want[c] != have[c])
        if nullability:
            differences.append(f"{table} differs in nullability of " + ", ".join(nullability))
    return differences
