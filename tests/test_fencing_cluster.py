"""A primary frozen past its grant, on real 2-server clusters.

A job fires every second and files arrive in a watched folder. The primary's primary-only
processes (scheduler, folder monitor, sentinel link) are SIGSTOPped; st2 takes over; the job
is paused on st2 (so its later fire times are nobody's: a stale claim could not hide behind
the unique (job, fire time) key); well past the old grant the processes get SIGCONT. Then,
from the database and the destination folder:

- no run of the paused job after the pause, and no run claimed by st1 from the freeze until
  st1 is primary again under a newer epoch (fail-back): the woken scheduler committed nothing;
- every file was announced, routed and delivered exactly once, none left behind;
- every transfer state was linked by the sentinel link (fenced consumers returned theirs);
- each woken process ended its old epoch's work within a few seconds of waking up.

And the window self-fencing cannot close, made certain with a fault point: a scheduler
frozen between deciding a claim and writing it; the database refuses the write.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, col, func, select

from ferrylink.clock import as_utc
from ferrylink.cluster import PRIMARY_ONLY_WORK, WORK_FOLDER_MONITOR, WORK_SCHEDULER
from ferrylink.contracts import transfer_state_id
from ferrylink.db import make_engine
from ferrylink.models import JobRun, ProcessedEvent, SentinelRecord, Transfer
from tests.cluster_support import Cluster
from tests.helpers import wait_until
from tests.scheduling_support import api, cluster_data_dir, cluster_engine, post

pytestmark = [pytest.mark.fault, pytest.mark.timeout(420)]

FROZEN = ("scheduler", "folder-monitor", "sentinel-link")
PAUSE_SETTLES = 2.5  # the new primary's scheduler re-reads its jobs every second
WOKEN_STOP_WITHIN = 3.0  # measured 0.1-0.3 s; slack for a loaded 2-core machine


def primary_working(cluster: Cluster, server: str) -> bool:
    return cluster.view()["primary"] == server and WORK_SCHEDULER in cluster.active(
        server, "scheduler"
    )


def activations(cluster: Cluster, server: str, service: str) -> list[dict[str, Any]]:
    history: list[dict[str, Any]] = cluster.get(server, service, "/work")["history"]
    return [a for a in history if a["unit"] in PRIMARY_ONLY_WORK]


def fenced_total(cluster: Cluster, server: str, service: str, judged_by: str = "") -> float:
    """`ferrylink_fenced_total` of a process (judged by the process and the database, or by
    the one named)."""
    url = f"http://127.0.0.1:{cluster.port(server, service)}/metrics"
    text = cluster.http.get(url, timeout=3).text
    pattern = rf'^ferrylink_fenced_total\{{judged_by="({judged_by or "[a-z]+"})"\}} (\S+)$'
    return sum(float(value) for _, value in re.findall(pattern, text, re.M))


def test_a_primary_frozen_past_its_grant_commits_nothing_when_it_wakes_up(
    postgres_url: str, make_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL (dropped after the cluster stopped): on SQLite a process frozen inside
    any write transaction (the sentinel link writes many) holds the one write lock, and the
    whole cluster waits for it."""
    monkeypatch.setenv("FERRYLINK_FOLDER_POLL_INTERVAL", "0.5")
    cluster: Cluster = make_cluster("active_active", servers=2, edges=0, database_url=postgres_url)
    wait_until(lambda: primary_working(cluster, "st1"), 90, "st1 primary, its scheduler running")
    wait_until(lambda: WORK_FOLDER_MONITOR in cluster.active("st1", "folder-monitor"), 30)

    tm = api(cluster, "st2", "transaction-manager")
    post(cluster, f"{tm}/accounts", {"name": "acme", "password": "a-long-password"})
    post(cluster, f"{tm}/routes", {"account": "acme", "pattern": "*.dat",
                          "steps": [{"kind": "move", "folder": "delivered/acme"}]})  # fmt: skip
    data = cluster_data_dir(cluster)
    inbox = data / "homes" / "acme" / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    post(cluster, f"{api(cluster, 'st2', 'folder-monitor')}/watches",
         {"account": "acme", "path": "homes/acme/inbox", "settle_seconds": 0.5})  # fmt: skip
    scheduler_api = api(cluster, "st2", "scheduler")
    job = post(cluster, f"{scheduler_api}/jobs", {
        "name": "tick", "kind": "dead_letter_purge", "interval_seconds": 1, "coalesce": False,
        "misfire_grace_seconds": 60, "params": {"days": 30},
    })  # fmt: skip
    engine = make_engine(postgres_url)

    def job_runs() -> list[JobRun]:
        with Session(engine) as session:
            return list(session.exec(select(JobRun).order_by(col(JobRun.fire_time))).all())

    def processed_arrivals() -> int:
        with Session(engine) as session:
            return session.exec(
                select(func.count(col(ProcessedEvent.event_id))).where(
                    ProcessedEvent.kind == "file.arrived"
                )
            ).one()

    # A partner drops a file every 0.1 s, under a temporary name renamed when complete.
    names: list[str] = []
    stop_dropping = threading.Event()

    def drop() -> None:
        i = 0
        while not stop_dropping.is_set():
            name = f"file-{i:04}.dat"
            (inbox / f"{name}.part").write_text(f"payload {i}\n")
            os.replace(inbox / f"{name}.part", inbox / name)
            names.append(name)
            i += 1
            stop_dropping.wait(0.1)  # the partner's pace, not synchronisation

    dropper = threading.Thread(target=drop, daemon=True)
    dropper.start()
    try:
        wait_until(lambda: sum(r.node_id == "st1" for r in job_runs()) >= 3, 30, "3 runs on st1")
        wait_until(lambda: processed_arrivals() >= 10, 60, "10 files routed")

        st1 = next(s for s in cluster.doc()["servers"] if s["id"] == "st1")
        pids = [st1["services"][service]["pid"] for service in FROZEN]
        stopped_at = time.time()
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        try:
            wait_until(lambda: primary_working(cluster, "st2"), 30, "st2 primary while frozen")
            paused = cluster.http.post(f"{scheduler_api}/jobs/{job['id']}/pause", timeout=10)
            assert paused.status_code == 200, paused.text
            paused_at = time.time()
            # The new primary works (files dropped during the freeze are delivered) and the
            # paused job's fire times pile up for a stale scheduler to claim, were it able to.
            dropped_while_frozen = len(names)
            wait_until(lambda: processed_arrivals() >= dropped_while_frozen, 60,
                       "files dropped during the freeze routed by st2")  # fmt: skip
            wait_until(lambda: time.time() >= paused_at + PAUSE_SETTLES + 3, 10,
                       "fire times of the paused job to pass")  # fmt: skip
        finally:
            for pid in pids:
                os.kill(pid, signal.SIGCONT)
        resumed_at = time.time()

        # Fail-back: st1 is primary again, under a newer epoch.
        wait_until(lambda: primary_working(cluster, "st1"), 60, "st1 primary again")
    finally:
        stop_dropping.set()
        dropper.join(5)
    wait_until(lambda: processed_arrivals() >= len(names), 90, f"all {len(names)} files routed")

    # The woken processes ended their old epoch's work at once (a loop finishes its step).
    ended_after_wake: dict[str, float] = {}
    for service in FROZEN:
        frozen_epoch = [a for a in activations(cluster, "st1", service) if a["start"] < stopped_at]
        assert frozen_epoch, service
        assert all(a["end"] is not None for a in frozen_epoch), (service, frozen_epoch)
        ended_after_wake[service] = round(max(a["end"] for a in frozen_epoch) - resumed_at, 3)
    assert all(seconds < WOKEN_STOP_WITHIN for seconds in ended_after_wake.values()), (
        ended_after_wake
    )
    back = [a for a in activations(cluster, "st1", "scheduler") if a["start"] > resumed_at]
    assert back, "st1's scheduler never started again"
    back_at = min(a["start"] for a in back)
    assert min(a["epoch"] for a in back) > max(
        a["epoch"] for a in activations(cluster, "st1", "scheduler") if a["start"] < stopped_at
    )

    runs = job_runs()
    # Nothing ran for the paused job after its pause settled on the new primary.
    paused_from = datetime.fromtimestamp(paused_at + PAUSE_SETTLES, UTC)
    late = [(r.node_id, r.fire_time, r.status) for r in runs
            if r.job_id == job["id"] and as_utc(r.fire_time) > paused_from]  # fmt: skip
    assert late == [], late
    # st1 claimed nothing from the freeze until it was primary again.
    frozen_from = datetime.fromtimestamp(stopped_at, UTC)
    primary_again = datetime.fromtimestamp(back_at, UTC)
    stale = [
        (r.fire_time, r.claimed_at, r.status)
        for r in runs
        if r.node_id == "st1" and frozen_from <= as_utc(r.claimed_at) < primary_again
    ]
    assert stale == [], stale
    # Each fire time once, and st2 ran the job while st1 was frozen.
    fire_times = [(r.job_id, r.fire_time) for r in runs]
    assert len(fire_times) == len(set(fire_times))
    assert any(
        r.node_id == "st2" and as_utc(r.fire_time) > frozen_from + timedelta(seconds=1)
        for r in runs
    )

    # Every file announced once, routed once, delivered once; none left behind.
    with Session(engine) as session:
        legs = session.exec(
            select(Transfer.file_name, Transfer.event_id).where(Transfer.leg == "receive")
        ).all()
        arrived = session.exec(
            select(ProcessedEvent.event_id).where(ProcessedEvent.kind == "file.arrived")
        ).all()
    assert sorted(path for path, _ in legs) == sorted(f"inbox/{name}" for name in names)
    assert sorted(event_id for _, event_id in legs) == sorted(arrived)
    delivered = data / "delivered" / "acme"
    assert sorted(p.name for p in delivered.iterdir()) == sorted(names)
    wait_until(lambda: not any(inbox.iterdir()), 10, "the inbox emptied")

    # Every transfer state reached the link data once (a fenced consumer returned its
    # messages to the queue rather than dropping or linking them).
    def unlinked() -> set[str]:
        with Session(engine) as session:
            states = {transfer_state_id(key, status, revision) for key, status, revision
                      in session.exec(select(Transfer.leg_key, Transfer.status,
                                             Transfer.revision))}  # fmt: skip
            linked = set(session.exec(select(SentinelRecord.id)).all())
        return states - linked

    wait_until(lambda: not unlinked(), 60, "every transfer state linked")
    print(
        "old work ended after waking (s):", ended_after_wake,
        "refusals counted by the woken processes:",
        {service: fenced_total(cluster, "st1", service) for service in FROZEN},
    )  # fmt: skip
    engine.dispose()


def process_state(pid: int) -> str:
    """The kernel's state letter of a process ('T' when stopped)."""
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0]


def test_a_claim_decided_before_a_freeze_is_refused_by_the_database(
    make_cluster: Any, tmp_path: Path
) -> None:
    """The window self-fencing cannot close: st1's scheduler took its grant's token and
    decided to claim a fire time, then froze (a fault point SIGSTOPs it right there, before
    its INSERT). The job is paused at once, so no one else claims that fire time; st2 takes
    over; SIGCONT: the claim reaches the database with the old epoch's token, and only the
    database's epoch check stands between it and a run of a paused job."""
    env = tmp_path / "state" / "env"
    env.mkdir(parents=True)
    (env / "st1.env").write_text(
        "FERRYLINK_FAULT_POINT=scheduler-before-claim\nFERRYLINK_FAULT_ACTION=stop\n"
    )
    cluster: Cluster = make_cluster("active_active", servers=2, edges=0)
    wait_until(lambda: primary_working(cluster, "st1"), 90, "st1 primary, its scheduler running")
    scheduler_pid = cluster.doc()["servers"][0]["services"]["scheduler"]["pid"]
    scheduler_api = api(cluster, "st2", "scheduler")
    job = post(cluster, f"{scheduler_api}/jobs", {
        "name": "tick", "kind": "dead_letter_purge", "interval_seconds": 1, "coalesce": False,
        "misfire_grace_seconds": 60, "params": {"days": 30},
    })  # fmt: skip
    try:
        wait_until(lambda: process_state(scheduler_pid) == "T", 30,
                   "st1's scheduler frozen at its first claim")  # fmt: skip
        paused = cluster.http.post(f"{scheduler_api}/jobs/{job['id']}/pause", timeout=10)
        assert paused.status_code == 200, paused.text
        wait_until(lambda: primary_working(cluster, "st2"), 30, "st2 primary while frozen")
    finally:
        os.kill(scheduler_pid, signal.SIGCONT)
    wait_until(lambda: process_state(scheduler_pid) != "T", 5, "st1's scheduler running")
    engine = cluster_engine(cluster)

    def runs() -> list[JobRun]:
        with Session(engine) as session:
            return list(session.exec(select(JobRun).where(JobRun.job_id == job["id"])).all())

    def refused() -> float:
        return fenced_total(cluster, "st1", "scheduler", "database")

    # It wakes and writes its claim: the database refuses the old epoch, or the claim of a
    # paused job's fire time commits.
    wait_until(lambda: refused() >= 1 or runs(), 20, "the woken scheduler's claim")
    assert [(r.node_id, r.fire_time, r.status) for r in runs()] == []
    assert refused() >= 1
    engine.dispose()
    wait_until(lambda: primary_working(cluster, "st1"), 60, "st1 primary again (fail-back)")
