"""Fencing tokens against real databases (SQLite and PostgreSQL): a primary-only write
commits only while the database's epoch is the writer's; the check holds the epoch still
until the commit; a writer frozen after its check cannot hold back the next epoch; the
database clock as a process reads it; the coordinator issues grants on that clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session

from ferrylink import fencing
from ferrylink.cluster import Heartbeat
from ferrylink.db import create_tables, make_engine
from ferrylink.fencing import DatabaseClock, Fence, Fenced, FencingToken, read_db_time
from ferrylink.models import ClusterSetting, ClusterState, LeaderLease
from ferrylink.runtime import ServiceRuntime
from services.cluster_coordinator import leadership, store
from services.cluster_coordinator.coordinator import Coordinator
from services.cluster_coordinator.settings import Settings

ST1 = FencingToken(5, "st1")


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    engine = make_engine(url)
    create_tables(engine)
    with Session(engine) as session:
        session.add(ClusterState(id=1, epoch=5, primary="st1"))
        session.commit()
    yield engine
    engine.dispose()


def set_epoch(engine: Engine, epoch: int, primary: str | None) -> None:
    with Session(engine) as session:
        state = session.get(ClusterState, 1)
        assert state is not None
        state.epoch, state.primary = epoch, primary
        session.add(state)
        session.commit()


def write(engine: Engine, key: str, token: FencingToken) -> None:
    """A primary-only write: a row, then the check, then the commit."""
    with Session(engine) as session:
        session.add(ClusterSetting(key=key, value="x"))
        session.flush()
        fencing.check(session, token)
        session.commit()


def written(engine: Engine, key: str) -> bool:
    with Session(engine) as session:
        return session.get(ClusterSetting, key) is not None


@pytest.mark.parametrize(
    ("epoch", "primary", "token", "commits"),
    [
        (5, "st1", ST1, True),  # the current grant
        (6, "st1", ST1, False),  # a newer epoch began (even with the same primary)
        (6, "st2", ST1, False),  # another primary took over
        (5, "st2", ST1, False),  # the epoch's primary is someone else
        (4, "st1", ST1, False),  # the database is behind the token: not its epoch either
        (5, None, ST1, False),  # no primary at all
    ],
)
def test_a_write_commits_only_under_the_current_epoch(
    engine: Engine, epoch: int, primary: str | None, token: FencingToken, commits: bool
) -> None:
    set_epoch(engine, epoch, primary)
    if commits:
        write(engine, "k", token)
    else:
        with pytest.raises(Fenced, match=f"the database has epoch {epoch}"):
            write(engine, "k", token)
    assert written(engine, "k") is commits


def test_no_cluster_state_means_fenced(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    create_tables(engine)
    with pytest.raises(Fenced, match="no cluster state"):
        write(engine, "k", ST1)
    assert not written(engine, "k")


def test_the_fence_tells_the_process_which_epoch_was_refused(engine: Engine) -> None:
    refused: list[FencingToken] = []
    fence = Fence(lambda: ST1, refused.append)
    set_epoch(engine, 6, "st2")
    with Session(engine) as session, pytest.raises(Fenced):
        fence.check(session, fence.token())
    assert refused == [ST1]
    fence.check_apart(engine, FencingToken(6, "st2"))  # a check of its own passes


def test_a_check_apart_waits_for_no_writer(engine: Engine) -> None:
    """What guards a POST (the sentinel link checks before each one) reads the epoch and
    holds nothing: it passes or refuses while another connection holds the database's
    write lock (SQLite) or the cluster_state row (PostgreSQL), instead of waiting for it
    and stalling the event path's writers meanwhile."""
    fence = Fence(lambda: ST1)
    outcomes: list[str] = []

    def check_both() -> None:
        fence.check_apart(engine, ST1)
        outcomes.append("passed")
        try:
            fence.check_apart(engine, FencingToken(4, "st1"))
        except Fenced:
            outcomes.append("refused")

    with engine.connect() as holder:
        if engine.dialect.name == "sqlite":
            holder.exec_driver_sql("BEGIN IMMEDIATE")
        holder.execute(text("UPDATE cluster_state SET epoch = epoch WHERE id = 1"))
        checker = threading.Thread(target=check_both)
        checker.start()
        checker.join(10)  # the writer still holds; a check that waits for it is still here
        finished = not checker.is_alive()
        holder.rollback()
    checker.join(60)
    assert finished, "the check waited for the writer"
    assert outcomes == ["passed", "refused"]


def other_connection_changes_epoch(engine: Engine, lock_timeout_ms: int) -> bool:
    """The leader's epoch change from another connection; False if it had to wait longer
    than `lock_timeout_ms` (PostgreSQL: a row lock; SQLite: the database's write lock)."""
    if engine.dialect.name == "postgresql":
        try:
            with engine.begin() as connection:
                connection.execute(text(f"SET LOCAL lock_timeout = {lock_timeout_ms}"))
                connection.execute(text("UPDATE cluster_state SET epoch = epoch + 1"))
            return True
        except OperationalError:
            return False
    other = make_engine(str(engine.url))
    try:
        with other.connect() as connection:
            connection.exec_driver_sql(f"PRAGMA busy_timeout={lock_timeout_ms}")
            connection.exec_driver_sql("UPDATE cluster_state SET epoch = epoch + 1")
            connection.commit()
        return True
    except OperationalError:
        return False
    finally:
        other.dispose()


def test_the_check_holds_the_epoch_until_the_commit(engine: Engine) -> None:
    """Between a passed check and its commit no epoch change can come in: it waits."""
    with Session(engine) as session:
        session.add(ClusterSetting(key="k", value="x"))
        session.flush()
        fencing.check(session, ST1)
        assert not other_connection_changes_epoch(engine, 300)
        session.commit()
    assert other_connection_changes_epoch(engine, 3000)
    with pytest.raises(Fenced):
        write(engine, "k2", ST1)


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)
def test_a_writer_frozen_after_its_check_cannot_hold_back_the_next_epoch(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process stopped between its check and its commit: PostgreSQL ends its transaction
    after the idle timeout, the epoch changes, and the woken writer commits nothing."""
    monkeypatch.setattr(fencing, "IDLE_TIMEOUT_SECONDS", 0.5)
    with Session(engine) as session:
        session.add(ClusterSetting(key="frozen", value="x"))
        session.flush()
        fencing.check(session, ST1)
        started = time.monotonic()
        assert other_connection_changes_epoch(engine, 10_000)  # waits for the timeout only
        assert time.monotonic() - started < 5
        with pytest.raises(OperationalError):  # the "frozen" writer wakes up
            session.commit()
    assert not written(engine, "frozen")


@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)  # SQLite: one writer anyway
def test_checks_of_concurrent_writers_do_not_wait_for_each_other(engine: Engine) -> None:
    with Session(engine) as first, Session(engine) as second:
        first.add(ClusterSetting(key="a", value="x"))
        first.flush()
        fencing.check(first, ST1)
        second.add(ClusterSetting(key="b", value="x"))
        second.flush()
        done = threading.Event()

        def check_second() -> None:
            fencing.check(second, ST1)
            done.set()

        thread = threading.Thread(target=check_second)
        thread.start()
        assert done.wait(5), "a shared lock waited for another shared lock"
        thread.join()
        second.commit()
        first.commit()
    assert written(engine, "a") and written(engine, "b")


def test_the_database_clock_as_a_process_reads_it(engine: Engine) -> None:
    clock = DatabaseClock(engine)
    before = clock.bounds()  # no reading yet: this host's clock
    assert before[0] == before[1]
    clock.read()
    earliest, latest = clock.bounds()
    with engine.connect() as connection:
        database = read_db_time(connection)
    _, after_latest = clock.bounds()
    # SQLite's clock has a resolution of a millisecond (it truncates), PostgreSQL's a µs.
    resolution = 0.001 if engine.dialect.name == "sqlite" else 1e-6
    assert earliest - resolution <= database <= after_latest
    assert 0 <= latest - earliest < 0.5


# -- the coordinator issues grants on the database's clock ---------------------------------------


@pytest.fixture
def coordinator(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Coordinator:
    """On SQLite; `parametrize("coordinator", ["postgresql"], indirect=True)` for PostgreSQL."""
    if getattr(request, "param", "sqlite") == "postgresql":
        monkeypatch.setenv("FERRYLINK_DATABASE_URL", request.getfixturevalue("postgres_url"))
    monkeypatch.setenv("FERRYLINK_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("FERRYLINK_SERVERS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("FERRYLINK_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2F")  # nobody
    monkeypatch.setenv("FERRYLINK_FENCE_MARGIN_SECONDS", "1.5")
    settings = Settings()
    runtime = ServiceRuntime("cluster-coordinator", settings)
    create_tables(runtime.engine)
    coordinator = Coordinator(runtime, settings)
    with Session(runtime.engine) as session:
        store.seed(session, settings.servers_file, settings.node_id, coordinator.defaults)
        leadership.ensure_lease_row(session)
    # Connected and hearing itself: it may lead.
    monkeypatch.setattr(type(runtime.publisher), "connected", property(lambda _self: True))
    monkeypatch.setattr(type(runtime.consumers), "connected", property(lambda _self: True))
    return coordinator


def hear_all(coordinator: Coordinator, node: str, at: float) -> None:
    for service in coordinator.settings.required_service_names:
        heartbeat = Heartbeat(node=node, service=service, pid=1, sent_at=at, config_version=1)
        coordinator.tracker.record(heartbeat, at)


@pytest.mark.parametrize("coordinator", ["sqlite", "postgresql"], indirect=True)
@pytest.mark.parametrize("host_clock_off_by", [-600.0, 600.0])
def test_a_coordinator_whose_host_clock_is_off_issues_grants_on_the_database_clock(
    coordinator: Coordinator, host_clock_off_by: float
) -> None:
    """Its own clock serves for heartbeat ages only; the lease and the assignment's times
    are the database's, whatever this host's clock says."""
    engine = coordinator.runtime.engine
    host_now = time.time() + host_clock_off_by
    hear_all(coordinator, "st1", host_now)
    with Session(engine) as session:
        database_before = read_db_time(session)
    assignment = coordinator.step(host_now)
    with Session(engine) as session:
        database_after = read_db_time(session)
        lease = session.get(LeaderLease, 1)
    assert assignment is not None and assignment.primary == "st1"
    lease_seconds = coordinator.settings.lease_seconds
    assert database_before <= assignment.issued_at <= database_after
    assert lease is not None and lease.holder == "st1"
    assert lease.expires_at == pytest.approx(assignment.issued_at + lease_seconds, abs=0.5)
    assert assignment.expires_at == pytest.approx(assignment.issued_at + lease_seconds, abs=0.5)
    assert assignment.not_before <= assignment.issued_at + 0.01  # a new cluster: at once


def test_a_new_primary_starts_after_the_old_grant_plus_the_margin(
    coordinator: Coordinator,
) -> None:
    engine = coordinator.runtime.engine
    with Session(engine) as session:
        store.write_servers(session, [store.ServerEntry("st1"), store.ServerEntry("st2")])
        session.commit()
    coordinator.node_id = "st2"  # the leader is st2's coordinator: it outlives st1
    now = time.time()
    hear_all(coordinator, "st1", now)
    hear_all(coordinator, "st2", now)
    first = coordinator.step(now)
    assert first is not None and first.primary == "st1"
    # st1 falls silent; st2 is heard. Past the connection timeout st2 is promoted, and may
    # start only once st1's last grant ran out, plus the margin.
    later = now + coordinator.settings.connection_timeout + 0.5
    hear_all(coordinator, "st2", later)
    second = coordinator.step(later)
    assert second is not None and second.primary == "st2" and second.epoch > first.epoch
    with Session(engine) as session:
        state = session.get(ClusterState, 1)
        assert state is not None
    margin = coordinator.settings.fence_margin_seconds
    assert margin == 1.5
    assert second.not_before == pytest.approx(
        max(second.issued_at, first.expires_at + margin), abs=0.01
    )
    assert second.not_before >= first.expires_at + margin
    assert state.issued_until >= second.expires_at
