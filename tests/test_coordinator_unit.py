"""The coordinator's leader step against a real database, without a broker connection."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlmodel import Session

from ferrylink.cluster import Heartbeat
from ferrylink.config import bump_config_version, read_config_version
from ferrylink.db import create_tables
from ferrylink.models import LeaderLease
from ferrylink.runtime import ServiceRuntime
from services.cluster_coordinator import leadership, store
from services.cluster_coordinator.coordinator import Coordinator
from services.cluster_coordinator.settings import Settings


@pytest.fixture
def coordinator(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Coordinator:
    monkeypatch.setenv("FERRYLINK_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("FERRYLINK_SERVERS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("FERRYLINK_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2F")  # nobody
    settings = Settings()
    runtime = ServiceRuntime("cluster-coordinator", settings)
    create_tables(runtime.engine)
    coordinator = Coordinator(runtime, settings)
    with Session(runtime.engine) as session:
        store.seed(session, settings.servers_file, settings.node_id, coordinator.defaults)
        leadership.ensure_lease_row(session)
    return coordinator


def test_a_coordinator_cut_off_from_the_broker_does_not_take_the_lease(
    coordinator: Coordinator,
) -> None:
    now = time.time()
    # It even hears (stale knowledge of) itself, but has no broker connection.
    coordinator.tracker.record(Heartbeat(node="st1", service="cluster-coordinator", pid=1,
                                         sent_at=now), now)  # fmt: skip
    assert not coordinator.can_lead(now)
    assert coordinator.step(now) is None
    with Session(coordinator.runtime.engine) as session:
        lease = session.get(LeaderLease, 1)
        assert lease is not None and lease.holder == "" and lease.term == 0
    assert not coordinator.is_leader()


def hear(coordinator: Coordinator, service: str, at: float, version: int) -> None:
    heartbeat = Heartbeat(node="st1", service=service, pid=1, sent_at=at, config_version=version)
    coordinator.tracker.record(heartbeat, at)


@pytest.mark.parametrize(
    ("sentinel_age", "sentinel_current", "synchronized"),
    [
        (0.0, True, True),  # every service on the current version
        (0.0, False, False),  # a live service on an old version, past the grace
        (4.0, False, False),  # late but within the 5 s timeout: still counts
        (100.0, False, True),  # dead (not heard within the timeout): its version is ignored
        (100.0, True, True),
    ],
)
def test_only_services_heard_within_the_timeout_count_for_synchronization(
    coordinator: Coordinator, sentinel_age: float, sentinel_current: bool, synchronized: bool
) -> None:
    engine = coordinator.runtime.engine
    with Session(engine) as session:
        current = bump_config_version(session)
        session.commit()
    assert read_config_version(engine) == current
    old = current - 1
    # The server counts as up without the sentinel link (a dead sentinel link is not fatal).
    coordinator.settings.required_services = "transaction-manager,cluster-coordinator"
    now = time.time()
    hear(coordinator, "transaction-manager", now, current)
    hear(coordinator, "cluster-coordinator", now, current)
    sentinel_version = current if sentinel_current else old
    hear(coordinator, "sentinel-link", now - sentinel_age, sentinel_version)
    with Session(engine) as session:
        # Behind since a moment past the grace period (3 heartbeat periods) ago.
        coordinator.view(session, now - 3.5 * coordinator.settings.heartbeat_interval)
        view = coordinator.view(session, now)
    assert view.live == {"st1"}
    assert ("st1" in view.synchronized) is synchronized
    assert view.services["st1"]["sentinel-link"]["config_version"] == sentinel_version
