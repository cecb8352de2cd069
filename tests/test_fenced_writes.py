"""Each primary-only writer against a real database, as a process that still believes its
grant while the database moved to a new epoch (what a primary frozen past its grant sees
when it wakes up): it commits nothing, publishes nothing new, and tells its follower.

Every test first shows the writer working under the current epoch, so a refusal is the
fence's doing, not a writer that does nothing anyway.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from ferrylink.consumer_manager import Delivery
from ferrylink.contracts import REASON_HEADER, DeadLetterPurge, Event, FileArrived, MaintenanceRun
from ferrylink.db import create_tables, make_engine
from ferrylink.fencing import Fence, Fenced, FencingToken
from ferrylink.models import (
    ClusterState,
    DeadEvent,
    JobRun,
    SentinelEndpoint,
    SentinelRecord,
    WatchedFile,
    WatchedFolder,
)
from services.folder_monitor.monitor import FolderMonitor
from services.scheduler.runner import JobScheduler
from services.sentinel_link.link import LinkStore
from services.transaction_manager.dead_letters import DeadLetterKeeper
from tests.helpers import wait_until
from tests.scheduling_support import add_account
from tests.test_scheduler import add_job, runs
from tests.test_sentinel_link_unit import state


@dataclass
class Grant:
    """The grant a process believes it holds (its follower's view), and what the database
    refused."""

    token: FencingToken = field(default_factory=lambda: FencingToken(5, "st1"))
    refused: list[FencingToken] = field(default_factory=list)

    def fence(self) -> Fence:
        return Fence(lambda: self.token, self.refused.append)


@pytest.fixture(params=["sqlite"])
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


def new_primary(engine: Engine) -> None:
    """The leader's epoch change: st2 is primary now (st1 is frozen and does not know)."""
    with Session(engine) as session:
        cluster = session.get(ClusterState, 1)
        assert cluster is not None
        cluster.epoch, cluster.primary = 6, "st2"
        session.add(cluster)
        session.commit()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_a_fenced_scheduler_claims_no_fire_time(engine: Engine) -> None:
    grant = Grant()
    published: list[Event] = []
    scheduler = JobScheduler(engine, "st1", published.append, sync_interval=0.2,
                             fence=grant.fence())  # fmt: skip
    job_id = add_job(engine)
    scheduler.start()
    try:
        wait_until(lambda: len(runs(engine, job_id)) >= 2, 15, "two runs under epoch 5")
        new_primary(engine)
        claimed = len(runs(engine, job_id))
        # Two more fire times come and are refused (each refusal reported to the follower).
        wait_until(lambda: len(grant.refused) >= 2, 15, "two fire times refused")
    finally:
        scheduler.stop()
    assert len(runs(engine, job_id)) == claimed
    assert set(grant.refused) == {FencingToken(5, "st1")}
    # Only runs claimed under epoch 5 were published, each once.
    event_ids = [e.id for e in published]
    assert len(event_ids) == len(set(event_ids))
    assert set(event_ids) <= {r.event_id for r in runs(engine, job_id)}


def test_a_fenced_scheduler_publishes_no_claimed_run_again(engine: Engine) -> None:
    """A run left claimed is published again by the primary only."""
    grant = Grant()
    published: list[Event] = []
    job_id = add_job(engine, enabled=False)
    fire = datetime(2025, 1, 1, tzinfo=UTC)
    event = MaintenanceRun(id="e1", job_id=job_id, fire_time=fire, task=DeadLetterPurge(days=30))
    with Session(engine) as session:
        session.add(JobRun(job_id=job_id, fire_time=fire, status="claimed", node_id="st1",
                           event_id=event.id, event_json=event.model_dump_json(),
                           claimed_at=fire))  # fmt: skip
        session.commit()
    new_primary(engine)
    scheduler = JobScheduler(engine, "st1", published.append, sync_interval=0.1,
                             republish_after=0.0, fence=grant.fence())  # fmt: skip
    scheduler.start()
    try:
        wait_until(lambda: grant.refused, 10, "the republish refused")
    finally:
        scheduler.stop()
    assert published == []
    assert [r.status for r in runs(engine, job_id)] == ["claimed"]
    # The new primary's scheduler does publish it.
    grant.token = FencingToken(6, "st2")
    scheduler.start()
    try:
        wait_until(lambda: runs(engine, job_id)[0].status == "submitted", 10, "republished")
    finally:
        scheduler.stop()
    assert [e.id for e in published] == ["e1"]


def watch_rows(engine: Engine) -> list[tuple[str, str | None]]:
    with Session(engine) as session:
        rows = session.exec(select(WatchedFile).order_by(col(WatchedFile.path))).all()
        return [(r.path, r.event_id) for r in rows]


def test_a_fenced_folder_monitor_records_and_announces_nothing(
    engine: Engine, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    home = add_account(engine, data_dir)
    (home / "inbox").mkdir()
    with Session(engine) as session:
        session.add(WatchedFolder(account="acme", folder="homes/acme/inbox", settle_seconds=0.0))
        session.commit()
    grant = Grant()
    published: list[FileArrived] = []
    monitor = FolderMonitor(engine, data_dir, published.extend, fence=grant.fence())
    (home / "inbox" / "a.csv").write_text("a\n")
    monitor.poll_once()  # seen
    monitor.poll_once()  # unchanged since: announced
    assert [e.path for e in published] == ["inbox/a.csv"]
    before = watch_rows(engine)
    assert [path for path, event_id in before if event_id] == ["a.csv"]

    new_primary(engine)
    (home / "inbox" / "b.csv").write_text("b\n")
    os.remove(home / "inbox" / "a.csv")
    for _ in range(3):
        assert monitor.poll_once() == 0
    assert watch_rows(engine) == before  # neither b.csv seen nor a.csv forgotten
    assert [e.path for e in published] == ["inbox/a.csv"]
    assert grant.refused and set(grant.refused) == {FencingToken(5, "st1")}


def test_a_fenced_folder_monitor_does_not_announce_a_file_it_saw_settle(
    engine: Engine, tmp_path: Path
) -> None:
    """Frozen after recording a file, woken after another primary took over: the file is
    the new primary's to announce."""
    data_dir = tmp_path / "data"
    home = add_account(engine, data_dir)
    (home / "inbox").mkdir()
    with Session(engine) as session:
        session.add(WatchedFolder(account="acme", folder="homes/acme/inbox", settle_seconds=0.0))
        session.commit()
    grant = Grant()
    published: list[FileArrived] = []
    monitor = FolderMonitor(engine, data_dir, published.extend, fence=grant.fence())
    (home / "inbox" / "a.csv").write_text("a\n")
    monitor.poll_once()
    assert watch_rows(engine) == [("a.csv", None)]
    new_primary(engine)
    monitor.poll_once()
    assert published == [] and watch_rows(engine) == [("a.csv", None)]
    # The new primary announces it.
    monitor.fence = Grant(FencingToken(6, "st2")).fence()
    monitor.poll_once()
    assert [e.path for e in published] == ["inbox/a.csv"]


def records(engine: Engine) -> int:
    with Session(engine) as session:
        return int(session.exec(select(func.count()).select_from(SentinelRecord)).one())


@pytest.mark.parametrize("local_link_data", [False, True])
def test_a_fenced_sentinel_link_links_and_delivers_nothing(
    engine: Engine, tmp_path: Path, local_link_data: bool
) -> None:
    """Shared link data (active_active, passive) and node-local link data (passive_legacy,
    checked against the shared database apart)."""
    link = make_engine(f"sqlite:///{tmp_path / 'link.db'}") if local_link_data else engine
    create_tables(link)
    grant = Grant()
    store = LinkStore(engine, link, grant.fence())
    with Session(engine) as session:
        session.add(SentinelEndpoint(name="t", url="http://127.0.0.1:1/", max_backlog=1))
        session.commit()
    endpoints = store.endpoints()
    endpoint = endpoints[0]
    assert endpoint.id is not None
    assert store.link_state(state("c1", "receive", "RECEIVING"), endpoints) == 1
    assert store.link_state(state("c1", "receive", "RECEIVED"), endpoints) == 2  # bound: 1
    before = (records(link), store.status())

    new_primary(engine)
    with pytest.raises(Fenced):
        store.link_state(state("c1", "route", "ROUTED"), endpoints)
    batch = store.next_batch(endpoint.id, 10)
    assert len(batch) == 1
    with pytest.raises(Fenced):
        store.delivered(endpoint.id, batch[0][0], time.time())
    with pytest.raises(Fenced):
        store.failed(endpoint.id, "HTTP 500", time.time())
    assert (records(link), store.status()) == before
    assert len(grant.refused) == 3


def test_a_fenced_dead_letter_keeper_keeps_nothing(engine: Engine) -> None:
    grant = Grant()
    keeper = DeadLetterKeeper(engine, "events", grant.fence())

    def dead(message_id: str) -> Delivery:
        headers: dict[str, Any] = {REASON_HEADER: "bad"}
        return Delivery(queue="events.dead", body=b"{}", headers=headers,
                        message_id=message_id, routing_key="", redelivered=False,
                        delivery_count=0)  # fmt: skip

    keeper(dead("m1"))
    new_primary(engine)
    with pytest.raises(Fenced):  # the consumer returns the message to the queue
        keeper(dead("m2"))
    with Session(engine) as session:
        assert [d.id for d in session.exec(select(DeadEvent)).all()] == ["m1"]
