"""Scheduled transfers against a real SFTP server, and the maintenance applications: what the
transaction manager runs for `transfer.scheduled` and `maintenance.run` events, each once
even when its event comes again."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from ferrylink.contracts import Event, FileArrived, MaintenanceRun, TransferScheduled
from ferrylink.models import DeadEvent, ProcessedEvent, ScheduledFile, ScheduledJob, Transfer
from services.scheduler.jobs import run_event
from services.transaction_manager import scheduled
from services.transaction_manager.scheduled import (
    run_maintenance,
    run_scheduled_transfer,
)
from tests.scheduling_support import add_account, add_partner
from tests.sftp_server import SftpServer

pytest_plugins = ["tests.scheduling_fixtures"]

FIRST_FIRE = datetime(2024, 6, 1, tzinfo=UTC)


@pytest.fixture
def remote(tmp_path: Path) -> Iterator[tuple[SftpServer, Path]]:
    root = tmp_path / "remote"
    with SftpServer(root, password="partner-secret") as server:
        yield server, root


@pytest.fixture
def home(engine: Engine, data_dir: Path, remote: tuple[SftpServer, Path]) -> Path:
    server, _root = remote
    add_partner(engine, host=server.host, port=server.port, password="partner-secret",
                host_key=server.host_key_line, check_host_key=True)  # fmt: skip
    return add_account(engine, data_dir)


class Announcements:
    """The `publish` the transaction manager passes in: records every file.arrived."""

    def __init__(self) -> None:
        self.events: list[FileArrived] = []
        self.fail_next = False

    def __call__(self, event: FileArrived) -> Future[None]:
        confirm: Future[None] = Future()
        if self.fail_next:
            self.fail_next = False
            confirm.set_exception(ConnectionError("broker unreachable"))
        else:
            self.events.append(event)
            confirm.set_result(None)
        return confirm


def job_event(kind: str, fire: datetime = FIRST_FIRE, /, **params: str) -> Event:
    job = ScheduledJob(id=3, name=f"{kind}-job", kind=kind, interval_seconds=60,
                       start_at=FIRST_FIRE, params_json=json.dumps(params))  # fmt: skip
    return run_event(job, fire)


def transfer(engine: Engine, data_dir: Path, event: Event, publish: Announcements) -> None:
    assert isinstance(event, TransferScheduled)
    run_scheduled_transfer(event, engine, data_dir, "st1", publish)


def legs(engine: Engine) -> list[tuple[str, str, str]]:
    with Session(engine) as session:
        rows = session.exec(select(Transfer).order_by(col(Transfer.id))).all()
        return [(r.leg, r.status, r.file_name) for r in rows]


# --------------------------------------------------------------------------------------------
# Pull
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_a_pull_fetches_each_remote_file_once(
    engine: Engine, data_dir: Path, home: Path, remote: tuple[SftpServer, Path]
) -> None:
    _server, root = remote
    for name, text in {"a.csv": "alpha", "b.csv": "bravo", "skip.txt": "x", ".c.csv": "x"}.items():
        (root / name).write_text(text)
    publish = Announcements()
    pull = {"partner": "bank", "account": "acme", "folder": "inbox", "pattern": "*.csv"}
    first = job_event("pull", **pull)

    transfer(engine, data_dir, first, publish)
    inbox = home / "inbox"
    assert sorted(p.name for p in inbox.iterdir()) == ["a.csv", "b.csv"]
    assert (inbox / "a.csv").read_text() == "alpha"
    assert [(e.kind, e.account, e.path, e.size) for e in publish.events] == [
        ("file.arrived", "acme", "inbox/a.csv", 5), ("file.arrived", "acme", "inbox/b.csv", 5),
    ]  # fmt: skip
    assert legs(engine) == [
        ("pull", "RECEIVED", "inbox/a.csv"),
        ("pull", "RECEIVED", "inbox/b.csv"),
    ]

    # The same event again (the transaction manager died before completing it), and the next
    # fire time: nothing is fetched again (a.csv, routed away meanwhile, does not come back).
    (inbox / "a.csv").unlink()
    transfer(engine, data_dir, first, publish)
    transfer(engine, data_dir, job_event("pull", FIRST_FIRE + timedelta(minutes=1), **pull),
             publish)  # fmt: skip
    assert len(publish.events) == 2 and not (inbox / "a.csv").exists()

    # A new file and a new version of b.csv: fetched, and announced under new ids.
    (root / "b.csv").write_text("bravo, second version")
    os.utime(root / "b.csv", (1_700_000_000, 1_700_000_000))
    (root / "d.csv").write_text("delta")
    third = job_event("pull", FIRST_FIRE + timedelta(minutes=2), **pull)
    transfer(engine, data_dir, third, publish)
    assert [e.path for e in publish.events[2:]] == ["inbox/b.csv", "inbox/d.csv"]
    assert (inbox / "b.csv").read_text() == "bravo, second version"
    assert len({e.id for e in publish.events}) == 4

    # A completed event is never run again, whatever the partner has now.
    (root / "e.csv").write_text("echo")
    with Session(engine) as session:
        session.add(ProcessedEvent(event_id=third.id, kind=third.kind, node_id="st2",
                                   processed_at=0))  # fmt: skip
        session.commit()
    transfer(engine, data_dir, third, publish)
    assert len(publish.events) == 4 and not (inbox / "e.csv").exists()


def test_a_pull_interrupted_before_announcing_announces_once_with_the_same_id(
    engine: Engine, data_dir: Path, home: Path, remote: tuple[SftpServer, Path]
) -> None:
    _server, root = remote
    (root / "a.csv").write_text("alpha")
    publish = Announcements()
    publish.fail_next = True
    event = job_event("pull", partner="bank", account="acme", folder="inbox")
    with pytest.raises(ConnectionError):
        transfer(engine, data_dir, event, publish)  # fetched, but not announced
    (root / "a.csv").unlink()  # and the partner no longer lists it
    (home / "inbox" / "a.csv").write_text("alpha")  # the fetched copy is what gets announced
    transfer(engine, data_dir, event, publish)
    assert [e.path for e in publish.events] == ["inbox/a.csv"]
    with Session(engine) as session:
        row = session.exec(select(ScheduledFile)).one()
    assert row.status == "published" and row.arrived_event_id == publish.events[0].id


def test_a_pull_can_delete_what_it_fetched(
    engine: Engine, data_dir: Path, home: Path, remote: tuple[SftpServer, Path]
) -> None:
    _server, root = remote
    (root / "a.csv").write_text("alpha")
    (root / "b.txt").write_text("bravo")
    publish = Announcements()
    event = job_event("pull", partner="bank", account="acme", pattern="*.csv",
                      delete_remote="true")  # fmt: skip
    transfer(engine, data_dir, event, publish)
    assert sorted(p.name for p in root.iterdir()) == ["b.txt"]
    assert (home / "a.csv").read_text() == "alpha" and [e.path for e in publish.events] == ["a.csv"]
    transfer(engine, data_dir, event, publish)
    assert len(publish.events) == 1


def test_partner_failures_are_recorded_in_the_transfer_log(
    engine: Engine, data_dir: Path, remote: tuple[SftpServer, Path]
) -> None:
    server, root = remote
    (root / "a.csv").write_text("alpha")
    add_partner(engine, name="wrong", host=server.host, port=server.port, password="guess",
                host_key=server.host_key_line, check_host_key=True)  # fmt: skip
    add_account(engine, data_dir)
    publish = Announcements()
    transfer(engine, data_dir, job_event("pull", partner="wrong", account="acme"), publish)
    transfer(engine, data_dir, job_event("push", partner="gone", account="acme"), publish)
    with Session(engine) as session:
        rows = session.exec(select(Transfer).order_by(col(Transfer.id))).all()
    assert [(r.leg, r.status, r.partner) for r in rows] == [
        ("list", "FAILED", "wrong"), ("push", "FAILED", None),
    ]  # fmt: skip
    assert "authentication failed" in rows[0].detail and "unknown partner" in rows[1].detail
    assert publish.events == []


# --------------------------------------------------------------------------------------------
# Push
# --------------------------------------------------------------------------------------------


def test_a_push_sends_each_local_file_once(
    engine: Engine, data_dir: Path, home: Path, remote: tuple[SftpServer, Path]
) -> None:
    _server, root = remote
    outbox = home / "outbox"
    outbox.mkdir()
    for name in ("x.csv", "y.csv", "z.csv.part", ".hidden.csv", "notes.txt"):
        (outbox / name).write_text(name)
    publish = Announcements()
    push = {"partner": "bank", "account": "acme", "folder": "outbox", "pattern": "*.csv"}
    first = job_event("push", **push)
    transfer(engine, data_dir, first, publish)
    assert sorted(p.name for p in root.iterdir()) == ["x.csv", "y.csv"]
    assert (root / "x.csv").read_text() == "x.csv"
    assert legs(engine) == [("push", "SENT", "outbox/x.csv"), ("push", "SENT", "outbox/y.csv")]

    # Again, and at the next fire time: nothing is sent twice.
    (root / "x.csv").unlink()
    transfer(engine, data_dir, first, publish)
    transfer(engine, data_dir, job_event("push", FIRST_FIRE + timedelta(minutes=1), **push),
             publish)  # fmt: skip
    assert sorted(p.name for p in root.iterdir()) == ["y.csv"]

    # A changed file is sent again; with delete_local, sent files leave the folder.
    (outbox / "y.csv").write_text("y, second version")
    later = job_event("push", FIRST_FIRE + timedelta(minutes=2), delete_local="true", **push)
    transfer(engine, data_dir, later, publish)
    assert (root / "y.csv").read_text() == "y, second version"
    assert sorted(p.name for p in outbox.iterdir()) == [
        ".hidden.csv", "notes.txt", "z.csv.part",
    ]  # fmt: skip
    assert publish.events == []


# --------------------------------------------------------------------------------------------
# Maintenance
# --------------------------------------------------------------------------------------------


def maintenance(engine: Engine, data_dir: Path, event: Event) -> None:
    assert isinstance(event, MaintenanceRun)
    run_maintenance(event, engine, data_dir, "st1")


def add_transfers(engine: Engine, started: dict[str, datetime]) -> None:
    with Session(engine) as session:
        for key, moment in started.items():
            session.add(Transfer(leg_key=key, cycle_id="c", event_id="e", leg="receive",
                                 direction="inbound", account="acme", file_name=key,
                                 protocol="sftp", status="RECEIVED", node_id="st1",
                                 started_at=moment))  # fmt: skip
        session.commit()


def transfer_keys(engine: Engine) -> list[str]:
    with Session(engine) as session:
        return sorted(session.exec(select(Transfer.leg_key)).all())


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_the_purge_removes_only_records_older_than_its_cutoff(
    engine: Engine, data_dir: Path
) -> None:
    # 30 days before the run's fire time (not before "now": a run that comes again later
    # removes the same records).
    cutoff = FIRST_FIRE - timedelta(days=30)
    second = timedelta(seconds=1)
    ages = {"a-day-older": cutoff - timedelta(days=1), "a-second-older": cutoff - second,
            "at-the-cutoff": cutoff, "a-second-newer": cutoff + second,
            "at-the-fire-time": FIRST_FIRE}  # fmt: skip
    add_transfers(engine, ages)
    with Session(engine) as session:
        for key, moment in ages.items():
            session.add(DeadEvent(id=key, queue="q", body=b"{}", dead_at=moment))
        session.commit()

    maintenance(engine, data_dir, job_event("transfer_log_purge", days="30"))
    kept = ["a-second-newer", "at-the-cutoff", "at-the-fire-time"]
    assert transfer_keys(engine) == kept
    with Session(engine) as session:
        assert len(session.exec(select(DeadEvent)).all()) == 5  # not its business

    maintenance(engine, data_dir, job_event("dead_letter_purge", days="30"))
    with Session(engine) as session:
        assert sorted(session.exec(select(DeadEvent.id)).all()) == kept

    # Fired later: counted from its own fire time.
    event = job_event("transfer_log_purge", FIRST_FIRE + timedelta(days=30), days="30")
    maintenance(engine, data_dir, event)
    assert transfer_keys(engine) == ["at-the-fire-time"]


def test_the_archive_moves_old_records_to_files_once(
    engine: Engine, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(scheduled, "ARCHIVE_CHUNK", 2)
    cutoff = FIRST_FIRE - timedelta(days=7)
    old = {f"old-{i}": cutoff - timedelta(hours=i + 1) for i in range(5)}
    add_transfers(engine, {**old, "new": cutoff + timedelta(hours=1)})
    event = job_event("transfer_log_archive", days="7", folder="archive/log")
    maintenance(engine, data_dir, event)

    folder = data_dir / "archive" / "log"
    files = sorted(folder.iterdir())
    assert len(files) == 3  # chunks of 2
    archived = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert sorted(r["leg_key"] for r in archived) == sorted(old)
    assert transfer_keys(engine) == ["new"]

    # The same run again (its event redelivered): the archive is not touched.
    contents = {f.name: f.read_text() for f in files}
    maintenance(engine, data_dir, event)
    assert {f.name: f.read_text() for f in sorted(folder.iterdir())} == contents


def test_temp_file_cleanup_removes_only_stale_temporary_files(
    engine: Engine, data_dir: Path, tmp_path: Path
) -> None:
    def make(relative: str, age: timedelta) -> Path:
        path = data_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(relative)
        moment = (FIRST_FIRE - age).timestamp()
        os.utime(path, (moment, moment))
        return path

    day = timedelta(hours=25)
    make("homes/acme/stale.part", day)
    make("homes/acme/sub/stale.tmp", day)
    make("homes/acme/.upload.csv.part", day)
    make("homes/acme/fresh.part", timedelta(hours=1))  # an upload under way
    make("homes/acme/old.csv", day)  # a real file, however old
    outside = tmp_path / "outside.part"
    outside.write_text("not ours")
    (data_dir / "homes" / "acme" / "link.part").symlink_to(outside)

    event = job_event("temp_file_cleanup", folder="homes", max_age_hours="24",
                      patterns="*.part,*.tmp")  # fmt: skip
    maintenance(engine, data_dir, event)
    left = sorted(str(p.relative_to(data_dir)) for p in data_dir.rglob("*") if not p.is_dir())
    assert left == ["homes/acme/fresh.part", "homes/acme/link.part", "homes/acme/old.csv"]
    assert outside.read_text() == "not ours"


def test_completed_maintenance_is_not_run_again(engine: Engine, data_dir: Path) -> None:
    add_transfers(engine, {"old": FIRST_FIRE - timedelta(days=365)})
    event = job_event("transfer_log_purge", days="30")
    with Session(engine) as session:
        session.add(ProcessedEvent(event_id=event.id, kind=event.kind, node_id="st2",
                                   processed_at=0))  # fmt: skip
        session.commit()
    maintenance(engine, data_dir, event)
    assert transfer_keys(engine) == ["old"]
    # A maintenance run of a transfer kind (or the reverse) cannot be built: the event's
    # kind and its task are one discriminated union (tests/unit/test_contracts.py).
