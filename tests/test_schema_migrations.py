"""Schema migrations (ferrylink.schema, `ferrylink db`), on SQLite and PostgreSQL.

- the head revision is exactly the models' schema (Alembic's comparison finds nothing, and
  the tables, columns, keys, indexes and serials are those create_all makes), so a model
  change without its migration fails here;
- the first revision is exactly the schema of the last release before migrations
  (tests/legacy_schema: that release's create_all statements, frozen), and a database of that
  release is recorded and upgraded by `ferrylink db upgrade` with its rows;
- a database at a revision this release does not know is refused, by the service process
  too; one at an older revision is upgraded only when asked; one whose tables differ from
  the first revision's is refused with the differences;
- processes that start at once on one new database create it once.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Column, Integer, String, Table, inspect, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, col, select

from ferrylink import schema
from ferrylink.db import make_engine
from ferrylink.models import (
    Account,
    AdminUser,
    ClusterSetting,
    OutboxMessage,
    Partner,
    Route,
    ScheduledJob,
    Transfer,
)
from ferrylink.runtime import SCHEMA_EXIT_CODE
from ferrylink.schema import (
    BASELINE,
    SchemaError,
    SchemaStatus,
    alembic_config,
    prepare_schema,
    upgrade_schema,
)
from ferrylink_ops.polling import wait_until
from tests.cluster_support import ferrylink

LEGACY_SCHEMA = Path(__file__).with_name("legacy_schema")
TEST_REVISIONS = Path(__file__).with_name("schema_revisions")
WHEN = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ferrylink.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def other_engine(
    tmp_path: Path, database_url: str, request: pytest.FixtureRequest
) -> Iterator[Engine]:
    """A second new database of the same kind, to compare schemas with."""
    if database_url.startswith("sqlite"):
        url = f"sqlite:///{tmp_path / 'other.db'}"
    else:
        url = request.getfixturevalue("second_postgres_url")
    engine = make_engine(url)
    yield engine
    engine.dispose()


@pytest.fixture
def second_postgres_url(postgres_url: str) -> Iterator[str]:
    """Another database next to `postgres_url`'s, dropped afterwards."""
    import psycopg2

    admin_dsn = os.environ.get("FERRYLINK_TEST_POSTGRES_DSN", "host=127.0.0.1 user=postgres")
    name = postgres_url.rsplit("/", 1)[1] + "_b"
    admin = psycopg2.connect(admin_dsn + " dbname=postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield postgres_url.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def next_revision() -> tuple[str, str]:
    """(the shipped head, the id of a revision after it)."""
    shipped = schema.quick_head()
    assert shipped is not None
    return shipped, f"{int(shipped) + 1:04d}"


@pytest.fixture
def with_test_revision(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
                       ) -> str:  # fmt: skip
    """Make tests/schema_revisions/probe.py (test only) this release's head: a revision after
    the shipped head (its id is returned)."""
    shipped, probe = next_revision()
    text = (TEST_REVISIONS / "probe.py").read_text()
    text = text.replace('"PROBE"', f'"{probe}"').replace('"SHIPPED_HEAD"', f'"{shipped}"')
    folder = tmp_path_factory.mktemp("revisions")
    (folder / f"{probe}_probe.py").write_text(text)
    monkeypatch.setattr(schema, "EXTRA_VERSION_LOCATIONS", [str(folder)])
    return probe


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def snapshot(engine: Engine) -> dict[str, Any]:
    """Everything about the tables that matters, as the database reports it: column names,
    types, nullability, defaults (PostgreSQL serials) in order, keys, indexes, unique
    constraints; on SQLite also the stored CREATE statements (AUTOINCREMENT)."""
    tables: dict[str, Any] = {}
    with engine.connect() as connection:
        inspector = inspect(connection)
        dialect = connection.dialect
        for table in sorted(set(inspector.get_table_names()) - {schema.VERSION_TABLE}):
            tables[table] = {
                "columns": [
                    (
                        c["name"],
                        c["type"].compile(dialect=dialect),
                        c["nullable"],
                        c.get("default"),
                        c.get("autoincrement"),
                    )  # fmt: skip
                    for c in inspector.get_columns(table)
                ],
                "primary_key": inspector.get_pk_constraint(table),
                "indexes": sorted(
                    (i["name"] or "", tuple(i["column_names"]), bool(i["unique"]))
                    for i in inspector.get_indexes(table)
                ),
                "unique": sorted(
                    (u["name"] or "", tuple(u["column_names"]))
                    for u in inspector.get_unique_constraints(table)
                ),
            }
        if dialect.name == "sqlite":
            rows = connection.exec_driver_sql(
                "SELECT type, name, sql FROM sqlite_master WHERE tbl_name != 'alembic_version' "
                "ORDER BY type, name"
            ).all()
            tables["<sqlite_master>"] = [
                (t, n, " ".join((sql or "").split())) for t, n, sql in rows
            ]
    return tables


def model_differences(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, SQLModel.metadata))


def create_legacy_schema(engine: Engine) -> None:
    """The tables the last release before migrations created (its create_all, frozen)."""
    sql = (LEGACY_SCHEMA / f"{engine.dialect.name}.sql").read_text()
    lines = [line for line in sql.splitlines() if not line.startswith("--")]
    statements = [s.strip() for s in "\n".join(lines).split(";\n") if s.strip()]
    with engine.begin() as connection:
        for statement in statements:
            connection.exec_driver_sql(statement.rstrip(";"))


def version_rows(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        if not inspect(connection).has_table(schema.VERSION_TABLE):
            return []
        return list(connection.execute(text("SELECT version_num FROM alembic_version")).scalars())


def stamp(engine: Engine, revision: str) -> None:
    """Write a revision into alembic_version by hand (as a newer release would have)."""
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM alembic_version"))
        connection.execute(text("INSERT INTO alembic_version VALUES (:r)"), {"r": revision})


def insert_legacy_rows(engine: Engine) -> None:
    """Rows in several tables, written by plain SQL against the old schema (as the old
    release stored them: timestamps in UTC)."""
    when = (
        "2024-05-01 12:00:00.000000"
        if engine.dialect.name == "sqlite"
        else "2024-05-01 12:00:00+00"
    )
    rows: list[tuple[str, dict[str, Any]]] = [
        (
            "INSERT INTO account (name, password_hash, ssh_public_keys, home, enabled, created_at) "
            "VALUES ('acme', 'scrypt$x', '', 'homes/acme', :t, :when)",
            {},
        ),
        (
            "INSERT INTO partner (name, protocol, host, port, username, password, private_key, "
            "private_key_passphrase, remote_folder, host_key, check_host_key, url, verify_tls, "
            "created_at) VALUES ('bank', 'sftp', 'sftp.bank.example', 22, 'acme', "
            "'fernet:abc', NULL, NULL, '/inbox', 'ssh-ed25519 AAAA', :t, '', :t, :when)",
            {},
        ),
        (
            "INSERT INTO route (account, pattern, position, steps_json, enabled, created_at) "
            "VALUES ('acme', '*.csv', 0, '[]', :t, :when)",
            {},
        ),
        (
            "INSERT INTO transfer (leg_key, cycle_id, event_id, leg, direction, account, "
            "file_name, bytes, protocol, partner, status, node_id, started_at, finished_at, "
            "duration_ms, detail) VALUES ('c1:received', 'c1', 'e1', 'received', 'inbound', "
            "'acme', 'orders.csv', 42, 'sftp', NULL, 'RECEIVED', 'st1', :when, NULL, NULL, '')",
            {},
        ),
        (
            "INSERT INTO scheduled_job (name, kind, cron, interval_seconds, timezone, start_at, "
            'params_json, misfire_grace_seconds, "coalesce", enabled, version, created_at, '
            "updated_at) VALUES ('nightly', 'pull', '0 2 * * *', NULL, 'UTC', :when, '{}', "
            "60.0, :t, :t, 1, :when, :when)",
            {},
        ),
        (
            "INSERT INTO outbox (routing_key, body, message_id, headers_json, created_at) "
            "VALUES ('events', :body, 'm1', '{}', 1.5)",
            {"body": b"\x00payload\xff"},
        ),
        (
            'INSERT INTO cluster_setting ("key", value, updated_at) '
            "VALUES ('cluster.mode', 'passive', :when)",
            {},
        ),
        (
            "INSERT INTO admin_user (name, password_hash, role, enabled, created_at) "
            "VALUES ('root', 'scrypt$y', 'admin', :t, :when)",
            {},
        ),
    ]
    with engine.begin() as connection:
        for statement, params in rows:
            connection.execute(text(statement), {"t": True, "when": when, **params})


def check_legacy_rows(engine: Engine) -> None:
    """The rows are there and the current models read and write them."""
    with Session(engine) as session:
        account = session.get(Account, "acme")
        assert account is not None and account.home == "homes/acme" and account.enabled
        assert account.created_at == WHEN
        partner = session.get(Partner, "bank")
        assert partner is not None and partner.password == "fernet:abc"
        assert partner.host_key == "ssh-ed25519 AAAA" and partner.check_host_key
        routes = session.exec(select(Route)).all()
        assert [(r.account, r.pattern) for r in routes] == [("acme", "*.csv")]
        transfer = session.exec(select(Transfer)).one()
        assert (transfer.leg_key, transfer.bytes, transfer.started_at) == ("c1:received", 42, WHEN)
        job = session.exec(select(ScheduledJob)).one()
        assert (job.name, job.cron, job.start_at, job.coalesce) == (
            "nightly",
            "0 2 * * *",
            WHEN,
            True,
        )
        outbox = session.exec(select(OutboxMessage)).one()
        assert outbox.body == b"\x00payload\xff"
        setting = session.get(ClusterSetting, "cluster.mode")
        assert setting is not None and setting.value == "passive"
        admin = session.get(AdminUser, "root")
        assert admin is not None and admin.role == "admin"
        # New rows get new ids after the old ones (serials and AUTOINCREMENT kept counting).
        session.add(Route(account="acme", pattern="*.xml", steps_json="[]"))
        session.add(OutboxMessage(routing_key="events", body=b"2", message_id="m2", created_at=2.0))
        session.commit()
        ids = session.exec(select(Route.id).order_by(col(Route.id))).all()
        assert ids[1] is not None and ids[0] is not None and ids[1] > ids[0]
        message_ids = session.exec(select(OutboxMessage.id).order_by(col(OutboxMessage.id))).all()
        assert len(set(message_ids)) == 2


# --------------------------------------------------------------------------------------------
# the head is the models' schema; the baseline is the last pre-migration release's
# --------------------------------------------------------------------------------------------


def test_head_schema_equals_the_models(engine: Engine, other_engine: Engine) -> None:
    before, after = upgrade_schema(engine)
    assert before.status is SchemaStatus.EMPTY
    assert after.status is SchemaStatus.CURRENT and after.revision == schema.head_revision()
    # A model changed without a migration (or a migration not matching the models) shows
    # here, first as Alembic's own comparison...
    assert model_differences(engine) == []
    # ...and then as everything create_all would have made differently (Alembic does not
    # compare serials, AUTOINCREMENT, constraint names or column order).
    SQLModel.metadata.create_all(other_engine)
    assert snapshot(engine) == snapshot(other_engine)


def test_the_checks_see_a_model_change_without_a_migration(engine: Engine) -> None:
    upgrade_schema(engine)
    extra = Table("not_migrated", SQLModel.metadata, Column("id", Integer, primary_key=True))
    try:
        differences = model_differences(engine)
    finally:
        SQLModel.metadata.remove(extra)
    assert [d[0] for d in differences] == ["add_table"]
    assert differences[0][1].name == "not_migrated"


def test_baseline_is_the_schema_of_the_release_before_migrations(
    engine: Engine, other_engine: Engine
) -> None:
    create_legacy_schema(engine)
    with other_engine.begin() as connection:
        command.upgrade(alembic_config(connection), BASELINE)
    assert snapshot(engine) == snapshot(other_engine)


def test_a_database_of_the_release_before_migrations_keeps_its_rows(
    engine: Engine, other_engine: Engine, database_url: str
) -> None:
    create_legacy_schema(engine)
    insert_legacy_rows(engine)
    with engine.connect() as connection:
        assert schema.schema_state(connection).status is SchemaStatus.LEGACY
    result = ferrylink("db", "upgrade", "--database-url", database_url, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "upgraded from the tables of a release before schema migrations to" in result.stdout
    assert f"{schema.head_revision()} (head)" in result.stdout
    assert version_rows(engine) == [schema.head_revision()]
    check_legacy_rows(engine)
    assert model_differences(engine) == []
    upgrade_schema(other_engine)
    assert snapshot(engine) == snapshot(other_engine)


# --------------------------------------------------------------------------------------------
# 0003: the sentinel link's outbox becomes a position per endpoint in one record log
# --------------------------------------------------------------------------------------------

SENTINEL_0002_ROWS = [
    "INSERT INTO sentinel_endpoint (id, name, url, paused, batch_size, max_backlog, "
    "max_age_seconds, created_at) VALUES (1, 'a', 'http://127.0.0.1:1/', false, 100, 1000, "
    "1e12, '2026-01-01 00:00:00'), (2, 'b', 'http://127.0.0.1:2/', false, 100, 1000, 1e12, "
    "'2026-01-01 00:00:00'), (3, 'c', 'http://127.0.0.1:3/', false, 100, 1000, 1e12, "
    "'2026-01-01 00:00:00')",
    # d: delivered to every endpoint; q and p: queued, linked in one batch (same time).
    "INSERT INTO sentinel_record (id, cycle_id, seq, body_json, linked_at) VALUES "
    "('d:receive:RECEIVED', 'd', 1, '{\"n\": \"d1\"}', 1), "
    "('d:route:ROUTED', 'd', 2, '{\"n\": \"d2\"}', 1), "
    "('q:route:TO_EXECUTE', 'q', 1, '{\"n\": \"q1\"}', 2), "
    "('q:route:ROUTED', 'q', 2, '{\"n\": \"q2\"}', 2), "
    "('p:route:ROUTED', 'p', 1, '{\"n\": \"p1\"}', 2)",
    # In outbox order (link order): b got q1 already; c got everything.
    "INSERT INTO sentinel_outbox (id, endpoint_id, record_id, created_at) VALUES "
    "(1, 1, 'q:route:TO_EXECUTE', 2), (2, 1, 'q:route:ROUTED', 2), (3, 2, 'q:route:ROUTED', 2),"
    " (4, 1, 'p:route:ROUTED', 2), (5, 2, 'p:route:ROUTED', 2)",
    # a and c have status rows; b has none yet.
    "INSERT INTO sentinel_delivery (endpoint_id, dropped, delivered, failures, last_error) "
    "VALUES (1, 0, 2, 0, ''), (3, 1, 7, 0, '')",
]


def test_sentinel_outbox_rows_become_each_endpoints_position(
    engine: Engine, other_engine: Engine
) -> None:
    from datetime import UTC
    from datetime import datetime as clock

    from ferrylink.contracts import TransferState
    from services.sentinel_link.link import LinkStore

    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0002")
    with engine.begin() as connection:
        for statement in SENTINEL_0002_ROWS:
            connection.execute(text(statement))
    upgrade_schema(engine)
    assert model_differences(engine) == []
    store = LinkStore(engine, engine)

    def queued() -> dict[int, list[str]]:
        return {e: [r["n"] for _, r in store.next_batch(e, 10)] for e in (1, 2, 3)}

    # Every record an endpoint had queued, in link order; b may get q2 again (it was queued
    # for b after q1, which b had), none is lost.
    assert queued() == {1: ["q1", "q2", "p1"], 2: ["q2", "p1"], 3: []}
    status = store.status()
    assert {e: status[e]["backlog"] for e in (1, 2, 3)} == {1: 3, 2: 2, 3: 0}
    assert (status[3]["delivered"], status[3]["dropped"]) == (7, 1)  # counts kept
    new = TransferState(leg_key="n:receive", cycle_id="n", event_id="n", leg="receive",
                        state="RECEIVED", account="acme", file_name="a.csv", bytes=1,
                        direction="inbound", protocol="sftp", node="st1",
                        at=clock(2026, 1, 1, tzinfo=UTC))  # fmt: skip
    assert store.link_state(new, store.endpoints()) == 1
    after = {e: [r.get("n") or r["id"] for _, r in store.next_batch(e, 10)] for e in (1, 2, 3)}
    assert after == {1: ["q1", "q2", "p1", new.id], 2: ["q2", "p1", new.id], 3: [new.id]}

    # Down again: each endpoint's backlog queued again as outbox rows, in order.
    with engine.begin() as connection:
        command.downgrade(alembic_config(connection), "0002")
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT endpoint_id, record_id FROM sentinel_outbox ORDER BY id")
        ).all()
    by_endpoint: dict[int, list[str]] = {}
    for endpoint_id, record_id in rows:
        by_endpoint.setdefault(endpoint_id, []).append(record_id)
    assert by_endpoint == {
        1: ["q:route:TO_EXECUTE", "q:route:ROUTED", "p:route:ROUTED", new.id],
        2: ["q:route:ROUTED", "p:route:ROUTED", new.id],
        3: [new.id],
    }
    with other_engine.begin() as connection:
        command.upgrade(alembic_config(connection), "0002")
    assert snapshot(engine) == snapshot(other_engine)  # 0002's schema exactly


# --------------------------------------------------------------------------------------------
# what a start does with each kind of database
# --------------------------------------------------------------------------------------------


def test_a_new_database_is_created_at_start_and_left_alone_after(engine: Engine) -> None:
    state = prepare_schema(engine, upgrade=False)
    assert state.status is SchemaStatus.CURRENT
    assert version_rows(engine) == [schema.head_revision()]
    assert prepare_schema(engine, upgrade=False) == state


def test_an_unknown_revision_is_refused(engine: Engine) -> None:
    upgrade_schema(engine)
    stamp(engine, "9999")
    for upgrade in (False, True):
        with pytest.raises(
            SchemaError, match="revision 9999, which this Ferrylink release does not know"
        ):
            prepare_schema(engine, upgrade=upgrade)
    assert version_rows(engine) == ["9999"]  # untouched


def test_a_service_refuses_to_start_on_an_unknown_revision(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    engine = make_engine(url)
    try:
        upgrade_schema(engine)
        stamp(engine, "9999")
    finally:
        engine.dispose()
    env = {**os.environ, "FERRYLINK_DATABASE_URL": url, "FERRYLINK_STATE_DIR": str(tmp_path),
           "FERRYLINK_HTTP_PORT": "0", "FERRYLINK_DATABASE_AUTO_UPGRADE": "true"}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "services.scheduler.main"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == SCHEMA_EXIT_CODE, result.stderr
    assert "scheduler refuses to start" in result.stderr
    assert "revision 9999, which this Ferrylink release does not know" in result.stderr
    refused = ferrylink("db", "upgrade", "--database-url", url, timeout=120)
    assert refused.returncode == 1
    assert "revision 9999, which this Ferrylink release does not know" in refused.stderr


def test_an_older_revision_is_upgraded_only_when_asked(
    engine: Engine, with_test_revision: str
) -> None:
    with engine.begin() as connection:
        command.upgrade(alembic_config(connection), BASELINE)
    with Session(engine) as session:
        session.add(Account(name="acme", home="homes/acme"))
        session.commit()
    needs = f"revision {BASELINE}; this release needs {with_test_revision}"
    with pytest.raises(SchemaError, match=needs) as info:
        prepare_schema(engine, upgrade=False)
    assert "`ferrylink db upgrade`" in str(info.value)
    assert "FERRYLINK_DATABASE_AUTO_UPGRADE=true" in str(info.value)
    assert version_rows(engine) == [BASELINE]
    state = prepare_schema(engine, upgrade=True)
    assert (state.status, state.revision) == (SchemaStatus.CURRENT, with_test_revision)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT name, probe FROM account")).all() == [("acme", None)]
        assert inspect(connection).has_table("schema_probe")


def test_a_database_before_migrations_is_recorded_then_held_to_the_upgrade_rule(
    engine: Engine, with_test_revision: str
) -> None:
    create_legacy_schema(engine)
    insert_legacy_rows(engine)
    needs = f"revision {BASELINE}; this release needs {with_test_revision}"
    with pytest.raises(SchemaError, match=needs):
        prepare_schema(engine, upgrade=False)
    assert version_rows(engine) == []  # a refused start changes nothing
    assert prepare_schema(engine, upgrade=True).revision == with_test_revision
    check_legacy_rows(engine)


def test_tables_unlike_the_baseline_are_refused_with_the_differences(engine: Engine) -> None:
    create_legacy_schema(engine)
    with engine.begin() as connection:
        connection.execute(text("DROP TABLE edge_limits"))
        connection.execute(text("ALTER TABLE account ADD COLUMN nickname VARCHAR(20)"))
        connection.execute(text("ALTER TABLE route DROP COLUMN position"))
    with pytest.raises(SchemaError) as info:
        prepare_schema(engine, upgrade=True)
    message = str(info.value)
    assert "no schema revision" in message
    assert "missing tables edge_limits" in message
    assert "account has unexpected columns nickname" in message
    assert "route lacks columns position" in message
    assert version_rows(engine) == []


def test_other_applications_tables_do_not_make_a_database_old(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE someone_else (id INTEGER PRIMARY KEY)"))
    assert prepare_schema(engine, upgrade=False).status is SchemaStatus.CURRENT
    assert "someone_else" in inspect(engine).get_table_names()


# --------------------------------------------------------------------------------------------
# processes that start at once
# --------------------------------------------------------------------------------------------

STARTER = """
import sys
from pathlib import Path
from ferrylink.db import make_engine
from ferrylink.schema import prepare_schema
from ferrylink_ops.polling import wait_until

url, go, ready = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
upgrade = sys.argv[4] == "upgrade"
engine = make_engine(url)
engine.connect().close()
ready.touch()
wait_until(go.exists, timeout=120, what="the go file", interval=0.002)
print(prepare_schema(engine, upgrade=upgrade).describe())
print("alembic" if "alembic" in sys.modules else "no alembic")
"""


@pytest.mark.parametrize("start", ["new", "before_migrations"])
def test_processes_starting_at_once_prepare_the_schema_once(
    engine: Engine, database_url: str, tmp_path: Path, start: str
) -> None:
    # A database of the release before migrations is recorded as the baseline, and the
    # revisions after it are applied by whoever may upgrade (FERRYLINK_DATABASE_AUTO_UPGRADE).
    upgrade = "keep"
    if start == "before_migrations":
        create_legacy_schema(engine)
        insert_legacy_rows(engine)
        upgrade = "upgrade" if schema.head_revision() != BASELINE else "keep"
    go = tmp_path / "go"
    starters = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                STARTER,
                database_url,
                str(go),
                str(tmp_path / f"ready{i}"),
                upgrade,
            ],  # fmt: skip
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(4)
    ]
    try:
        wait_until(lambda: all((tmp_path / f"ready{i}").exists() for i in range(4)), 120,
                   "every starter to connect")  # fmt: skip
        go.touch()
        outputs = [p.communicate(timeout=120) for p in starters]
    finally:
        for p in starters:
            p.kill()
    for p, (out, err) in zip(starters, outputs, strict=True):
        assert p.returncode == 0, err
        assert out.splitlines()[0] == f"{schema.head_revision()} (head)"
    # Only the process that did the work imported Alembic (~8 MB for the process's life).
    assert sorted(out.splitlines()[1] for out, _ in outputs) == ["alembic"] + ["no alembic"] * 3
    assert version_rows(engine) == [schema.head_revision()]
    assert model_differences(engine) == []
    if start == "before_migrations":
        check_legacy_rows(engine)


def test_a_service_at_the_head_does_not_import_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    engine = make_engine(url)
    try:
        upgrade_schema(engine)
    finally:
        engine.dispose()
    code = (
        "import sys; from ferrylink.db import make_engine; from ferrylink.schema import "
        f"prepare_schema; print(prepare_schema(make_engine({url!r}), upgrade=False).status, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('alembic', 'mako')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["current", "[]"]


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------


def test_db_current_and_upgrade(
    database_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    head = schema.head_revision()
    # The database from the settings (FERRYLINK_DATABASE_URL), or --database-url.
    monkeypatch.setenv("FERRYLINK_DATABASE_URL", database_url)
    current = ferrylink("db", "current", timeout=120)
    assert current.returncode == 0, current.stderr
    expected = (
        "none (no database file" if database_url.startswith("sqlite") else "none (empty database)"
    )
    assert expected in current.stdout
    if database_url.startswith("sqlite"):
        assert not (tmp_path / "ferrylink.db").exists()  # asking did not create it
    upgraded = ferrylink("db", "upgrade", timeout=120)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"upgraded from an empty database to {head} (head)" in upgraded.stdout
    monkeypatch.delenv("FERRYLINK_DATABASE_URL")
    again = ferrylink("db", "upgrade", "--database-url", database_url, timeout=120)
    assert f"already at {head} (head)" in again.stdout
    current = ferrylink("db", "current", "--database-url", database_url, timeout=120)
    assert current.stdout.strip().endswith(f": {head} (head)")
    if database_url.startswith("postgresql"):
        # The local server trusts any password; the output must not show it.
        with_password = database_url.replace("postgres@", "postgres:s3cret@")
        current = ferrylink("db", "current", "--database-url", with_password, timeout=120)
        assert current.returncode == 0, current.stderr
        assert "s3cret" not in current.stdout and "postgres:***@" in current.stdout


def test_db_revision_drafts_a_migration_of_the_models_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ferrylink_ops.schema_tools import new_revision

    shipped, draft_id = next_revision()
    monkeypatch.setattr(schema, "EXTRA_VERSION_LOCATIONS", [str(tmp_path)])
    extra = Table(
        "draft_probe",
        SQLModel.metadata,
        Column("id", Integer, primary_key=True),
        Column("note", String(64), nullable=False),
    )
    try:
        path = new_revision("add draft probe", tmp_path)
    finally:
        SQLModel.metadata.remove(extra)
    assert path.parent == tmp_path and path.name == f"{draft_id}_add_draft_probe.py"
    draft = path.read_text()
    assert f"revision: str = '{draft_id}'" in draft
    assert f"down_revision: str | Sequence[str] | None = '{shipped}'" in draft
    assert "op.create_table('draft_probe'" in draft
    assert "sa.String(length=64)" in draft and "sqlmodel" not in draft
    compile(draft, str(path), "exec")
