"""The folder monitor: a file is announced once, only when complete, and a new primary
continues without announcing a file again or missing one.

Unit tests for the stability and ignore rules; real files, a real broker and SQLite for the
monitor itself; the HTTP API in-process; and a 3-server cluster whose primary is SIGKILLed
while 500 files are dropped.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from ferrylink.api_app import build_api
from ferrylink.cluster import WORK_FOLDER_MONITOR
from ferrylink.contracts import FileArrived
from ferrylink.models import ProcessedEvent, Transfer, WatchedFile, WatchedFolder
from ferrylink.paths import is_temporary
from services.folder_monitor.api import WatchStore, routers
from services.folder_monitor.monitor import (
    FolderMonitor,
    Observation,
    Seen,
    plan_poll,
    scan,
)
from tests.admin_support import admin_headers
from tests.cluster_support import Cluster
from tests.helpers import wait_until
from tests.scheduling_support import (
    EventQueue,
    add_account,
    api,
    cluster_data_dir,
    cluster_engine,
    post,
)

pytest_plugins = ["tests.scheduling_fixtures"]


# --------------------------------------------------------------------------------------------
# Rules (pure)
# --------------------------------------------------------------------------------------------


def test_temporary_names_are_ignored(tmp_path: Path) -> None:
    for name in ("a.part", "a.tmp", "report.csv.partial", "x.filepart", ".upload", ".a.part"):
        assert is_temporary(name), name
    for name in ("a.csv", "part", "a.part.csv", "tmp", "report.TMPL"):
        assert not is_temporary(name), name

    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / ".hidden-dir").mkdir()
    for rel in ("a.csv", "b.txt", "c.csv.part", "d.tmp", ".e.csv", "sub/f.csv",
                "sub/deeper/g.csv", ".hidden-dir/h.csv"):  # fmt: skip
        (tmp_path / rel).write_text(rel)
    (tmp_path / "link.csv").symlink_to(tmp_path / "a.csv")
    assert set(scan(tmp_path, "*", recursive=False)) == {"a.csv", "b.txt"}
    assert set(scan(tmp_path, "*.csv", recursive=False)) == {"a.csv"}
    assert set(scan(tmp_path, "*.csv", recursive=True)) == {
        "a.csv", "sub/f.csv", "sub/deeper/g.csv",
    }  # fmt: skip
    size = (tmp_path / "a.csv").stat()
    assert scan(tmp_path, "a.csv", False)["a.csv"] == Observation(size.st_size, size.st_mtime_ns)


def test_a_file_is_complete_once_unchanged_for_the_settle_time() -> None:
    obs = Observation(10, 1_000)
    # First seen: remembered, not complete (even with no settle time: two polls at least).
    plan = plan_poll({}, {"a": obs}, now=100.0, settle=0.0)
    assert plan.observe == {"a": obs} and plan.complete == []
    pending = {"a": Seen(10, 1_000, observed_at=100.0, emitted=False)}
    # Unchanged but not for long enough.
    plan = plan_poll(pending, {"a": obs}, now=101.9, settle=2.0)
    assert plan.observe == {} and plan.complete == []
    # Unchanged for the settle time: complete.
    assert plan_poll(pending, {"a": obs}, now=102.0, settle=2.0).complete == ["a"]
    # Grew, or touched, meanwhile: the settle time starts again.
    for changed in (Observation(11, 1_000), Observation(10, 2_000)):
        plan = plan_poll(pending, {"a": changed}, now=150.0, settle=2.0)
        assert plan.observe == {"a": changed} and plan.complete == []
    # Emitted: never again while unchanged; changed later: a new version to announce.
    emitted = {"a": Seen(10, 1_000, observed_at=100.0, emitted=True)}
    assert plan_poll(emitted, {"a": obs}, now=999.0, settle=2.0).complete == []
    assert plan_poll(emitted, {"a": Observation(12, 3_000)}, 999.0, 2.0).observe
    # Gone: forgotten, so a file of that name later is new.
    assert plan_poll(emitted, {}, now=999.0, settle=2.0).vanished == ["a"]


# --------------------------------------------------------------------------------------------
# The monitor on real files, a real broker and a database
# --------------------------------------------------------------------------------------------


def add_watch(engine: Engine, folder: str, **fields: Any) -> int:
    with Session(engine) as session:
        watch = WatchedFolder(account="acme", folder=folder, **fields)
        session.add(watch)
        session.commit()
        assert watch.id is not None
        return watch.id


def test_a_file_being_written_is_announced_only_when_complete(
    engine: Engine, data_dir: Path, event_queue: EventQueue
) -> None:
    home = add_account(engine, data_dir)
    inbox = home / "inbox"
    inbox.mkdir()
    add_watch(engine, "homes/acme/inbox", settle_seconds=1.5)
    monitor = FolderMonitor(engine, data_dir, event_queue.publish_batch, interval=0.1)
    monitor.start()
    try:
        # A slow writer: appends every 0.2 s for 3 s, i.e. for twice the settle time.
        big = inbox / "big.dat"
        with big.open("wb") as stream:
            for _ in range(15):
                stream.write(b"x" * 1000)
                stream.flush()
                time.sleep(0.2)  # the writer's pace, not synchronisation
        closed_at = time.monotonic()
        # An upload under a temporary name, renamed when done.
        part = inbox / "small.csv.part"
        part.write_text("a,b\n")
        polls = monitor.polls
        wait_until(lambda: monitor.polls >= polls + 3, 10, "three polls seeing the .part")
        os.replace(part, inbox / "small.csv")

        def both_announced() -> bool:
            return {e.path for _, e in event_queue.published_arrivals} >= {
                "inbox/big.dat",
                "inbox/small.csv",
            }

        wait_until(both_announced, 15, "both files announced")
    finally:
        monitor.stop()

    published = event_queue.published_arrivals
    big_events = [(at, e) for at, e in published if e.path == "inbox/big.dat"]
    assert len(big_events) == 1
    at, event = big_events[0]
    assert at >= closed_at and event.size == 15_000  # never early, never partial
    assert event.kind == "file.arrived" and event.account == "acme"
    assert not any(e.path.endswith(".part") for _, e in published)
    # On the broker, once each.
    assert Counter(e.path for e in event_queue.drain_arrivals()) == {
        "inbox/big.dat": 1, "inbox/small.csv": 1,
    }  # fmt: skip
    # Further polls announce nothing new.
    assert monitor.poll_once() == 0


def test_changed_files_again_vanished_forgotten_recursion_and_patterns(
    engine: Engine, data_dir: Path, event_queue: EventQueue
) -> None:
    home = add_account(engine, data_dir)
    (home / "in" / "sub").mkdir(parents=True)
    flat = add_watch(engine, "homes/acme/in", pattern="*.csv", settle_seconds=0)
    deep = add_watch(engine, "homes/acme/in/sub", recursive=True, settle_seconds=0)
    monitor = FolderMonitor(engine, data_dir, event_queue.publish_batch)
    (home / "in" / "a.csv").write_text("1")
    (home / "in" / "b.txt").write_text("1")
    (home / "in" / "sub" / "c.csv").write_text("1")
    (home / "in" / "sub" / "d").mkdir()
    (home / "in" / "sub" / "d" / "e.bin").write_text("1")

    assert monitor.poll_once() == 0  # first sight: remembered only
    assert monitor.poll_once() == 3
    assert sorted(e.path for _, e in event_queue.published_arrivals) == [
        "in/a.csv", "in/sub/c.csv", "in/sub/d/e.bin",
    ]  # fmt: skip
    assert monitor.poll_once() == 0

    (home / "in" / "a.csv").write_text("22")  # changed: announced again, with a new id
    os.utime(home / "in" / "a.csv", ns=(1, 1_000_000_000))
    assert monitor.poll_once() == 0
    assert monitor.poll_once() == 1
    first, second = [e for _, e in event_queue.published_arrivals if e.path == "in/a.csv"]
    assert first.id != second.id and second.size == 2

    (home / "in" / "sub" / "c.csv").unlink()
    monitor.poll_once()
    with Session(engine) as session:
        paths = {(r.watch_id, r.path) for r in session.exec(select(WatchedFile)).all()}
    assert paths == {(flat, "a.csv"), (deep, "d/e.bin")}
    assert len(event_queue.drain_arrivals()) == 4


class CrashAfterPublish(Exception):
    """The process died right after the broker confirmed, before the database was told."""


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_a_new_primary_neither_reannounces_nor_misses(
    engine: Engine, data_dir: Path, event_queue: EventQueue
) -> None:
    home = add_account(engine, data_dir)
    (home / "in").mkdir()
    add_watch(engine, "homes/acme/in", settle_seconds=0)
    for i in range(250):
        (home / "in" / f"f{i:03}.dat").write_text(str(i))

    calls = 0

    def publish_then_crash(events: list[FileArrived]) -> None:
        nonlocal calls
        calls += 1
        event_queue.publish_batch(events)
        if calls == 2:
            raise CrashAfterPublish()

    old_primary = FolderMonitor(engine, data_dir, publish_then_crash, batch_size=100)
    old_primary.poll_once()
    with pytest.raises(CrashAfterPublish):
        old_primary.poll_once()  # batch 1 recorded, batch 2 published but not recorded
    for i in range(250, 300):  # more files arrive during the failover
        (home / "in" / f"f{i:03}.dat").write_text(str(i))

    new_primary = FolderMonitor(engine, data_dir, event_queue.publish_batch, batch_size=100)
    new_primary.poll_once()
    new_primary.poll_once()
    assert new_primary.poll_once() == 0

    ids_by_path: dict[str, set[str]] = {}
    for event in event_queue.drain_arrivals():
        ids_by_path.setdefault(event.path, set()).add(event.id)
    assert len(ids_by_path) == 300  # none missed
    assert all(len(ids) == 1 for ids in ids_by_path.values())  # a repeat reuses its id
    # The unrecorded batch went out twice with the same ids; the rest once.
    assert len(event_queue.published_arrivals) == 300 + 100


# --------------------------------------------------------------------------------------------
# HTTP API
# --------------------------------------------------------------------------------------------


@pytest.fixture
def client(engine: Engine, data_dir: Path) -> Iterator[TestClient]:
    app = build_api(title="folder-monitor", engine=engine, routers=routers,
                    service=WatchStore(data_dir))  # fmt: skip
    with TestClient(app, headers=admin_headers(engine)) as test_client:
        yield test_client


def test_api_creates_lists_pauses_and_deletes_watches(
    client: TestClient, engine: Engine, data_dir: Path
) -> None:
    home = add_account(engine, data_dir)
    (home / "in").mkdir()
    created = client.post("/watches", json={"account": "acme", "path": "homes/acme/in",
                                            "pattern": "*.csv", "recursive": True})  # fmt: skip
    assert created.status_code == 201, created.text
    watch = created.json()
    assert watch["path"] == "homes/acme/in" and watch["enabled"] and watch["recursive"]
    absolute = client.post("/watches", json={"account": "acme", "path": str(home)})
    assert absolute.status_code == 201 and absolute.json()["path"] == "homes/acme"
    assert [w["id"] for w in client.get("/watches").json()["items"]] == [
        watch["id"],
        absolute.json()["id"],
    ]

    paused = client.post(f"/watches/{watch['id']}/pause").json()
    assert paused["enabled"] is False
    with Session(engine) as session:
        assert session.get(WatchedFolder, watch["id"]).enabled is False  # type: ignore[union-attr]
    assert client.post(f"/watches/{watch['id']}/resume").json()["enabled"] is True

    with Session(engine) as session:
        session.add(WatchedFile(watch_id=watch["id"], path="x.csv", size=1, mtime_ns=1,
                                observed_at=0, event_id="e1"))  # fmt: skip
        session.commit()
    got = client.get(f"/watches/{watch['id']}").json()
    assert (got["files_tracked"], got["files_emitted"]) == (1, 1)
    assert client.delete(f"/watches/{watch['id']}").status_code == 204
    assert client.get(f"/watches/{watch['id']}").status_code == 404
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(WatchedFile)).one() == 0


def test_api_refuses_bad_watches_with_the_reason(
    client: TestClient, engine: Engine, data_dir: Path
) -> None:
    home = add_account(engine, data_dir)
    (home / "in").mkdir()
    (data_dir / "elsewhere").mkdir()
    (home / "escape").symlink_to(data_dir.parent)
    cases = {
        "/etc": "outside the data directory",
        "../outside": "may not contain '..'",
        "homes/acme/../../..": "may not contain '..'",
        "homes/acme/escape": "leaves its base folder",
        "elsewhere": "not inside the account's home",
        "homes/acme/missing": "does not exist",
    }
    for path, reason in cases.items():
        response = client.post("/watches", json={"account": "acme", "path": path})
        assert response.status_code == 422, (path, response.text)
        assert reason in response.json()["error"]["message"], (path, response.text)
    unknown = client.post("/watches", json={"account": "nobody", "path": "homes/acme/in"})
    assert unknown.status_code == 422 and "unknown account" in unknown.json()["error"]["message"]
    slash = client.post("/watches", json={"account": "acme", "path": "homes/acme/in",
                                          "pattern": "a/*.csv"})  # fmt: skip
    assert slash.status_code == 422 and "may not contain '/'" in slash.text
    assert client.post("/watches/999/pause").status_code == 404
    assert client.get("/watches").json()["items"] == []


# --------------------------------------------------------------------------------------------
# A 3-server cluster: the primary is SIGKILLed while 500 files are dropped
# --------------------------------------------------------------------------------------------


@pytest.mark.fault
@pytest.mark.timeout(300)
def test_500_files_across_a_primary_kill_arrive_and_are_delivered_once(
    make_cluster: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRYLINK_FOLDER_POLL_INTERVAL", "0.5")
    cluster: Cluster = make_cluster("active_active")
    wait_until(lambda: WORK_FOLDER_MONITOR in cluster.active("st1", "folder-monitor"), 60,
               "st1 running the folder monitor")  # fmt: skip
    data = cluster_data_dir(cluster)
    tm = api(cluster, "st2", "transaction-manager")
    post(cluster, f"{tm}/accounts", {"name": "acme", "password": "a-long-password"})
    post(cluster, f"{tm}/routes", {"account": "acme", "pattern": "*.dat",
                          "steps": [{"kind": "move", "folder": "delivered/acme"}]})  # fmt: skip
    inbox = data / "homes" / "acme" / "inbox"
    inbox.mkdir(parents=True)
    post(cluster, f"{api(cluster, 'st3', 'folder-monitor')}/watches",
         {"account": "acme", "path": "homes/acme/inbox", "settle_seconds": 1.0})  # fmt: skip

    names = [f"file-{i:03}.dat" for i in range(500)]
    engine = cluster_engine(cluster)
    dropped = threading.Event()

    def drop() -> None:
        # Half written in place, half uploaded under a temporary name and renamed.
        for i, name in enumerate(names):
            if i % 2:
                (inbox / name).write_text(f"payload {i}\n")
            else:
                (inbox / f"{name}.part").write_text(f"payload {i}\n")
                os.replace(inbox / f"{name}.part", inbox / name)
            time.sleep(0.02)  # a steady stream over ~10 s, not synchronisation
        dropped.set()

    dropper = threading.Thread(target=drop, daemon=True)
    dropper.start()
    # Kill the primary mid-way: once some files were routed, while many were not yet.
    wait_until(lambda: _arrived(engine) >= 100, 60, "the first 100 files processed")
    cluster.run("server", "kill", "st1")
    assert _arrived(engine) < 500
    wait_until(lambda: WORK_FOLDER_MONITOR in cluster.active("st2", "folder-monitor"), 30,
               "st2 running the folder monitor")  # fmt: skip
    assert dropped.wait(60)
    wait_until(lambda: _arrived(engine) >= 500, 90, "all 500 files processed")

    # Exactly one file.arrived per file: the transaction manager recorded one receive leg
    # per path, under one event id each, and completed no other file.arrived event.
    with Session(engine) as session:
        legs = session.exec(
            select(Transfer.file_name, Transfer.event_id).where(Transfer.leg == "receive")
        ).all()
        arrived = session.exec(
            select(ProcessedEvent.event_id).where(ProcessedEvent.kind == "file.arrived")
        ).all()
    assert sorted(path for path, _ in legs) == [f"inbox/{name}" for name in names]
    assert sorted(event_id for _, event_id in legs) == sorted(arrived)
    # And one routed delivery each: every file is in the destination once, none left behind.
    delivered = data / "delivered" / "acme"
    assert sorted(p.name for p in delivered.iterdir()) == names
    assert all((delivered / name).read_text() == f"payload {i}\n" for i, name in enumerate(names))
    wait_until(lambda: not any(inbox.iterdir()), 10, "the inbox emptied")
    engine.dispose()


def _arrived(engine: Engine) -> int:
    with Session(engine) as session:
        return session.exec(
            select(func.count(col(ProcessedEvent.event_id))).where(
                ProcessedEvent.kind == "file.arrived"
            )
        ).one()
