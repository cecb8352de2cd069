"""The coordinator's leader step against a real database, without a broker connection."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlmodel import Session

from ferrylink.cluster import Heartbeat
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
