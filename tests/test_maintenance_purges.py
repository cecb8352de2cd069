"""Nothing grows forever: each bookkeeping purge, run as the transaction manager runs it (the
event handler, in-process) on real SQLite and PostgreSQL. Old finished rows go; recent
rows, unfinished rows and whatever a pending copy of a message still needs stay; the job run
records how many rows it removed. The default maintenance jobs are created once."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import Future
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from sqlalchemy.engine import Engine
from sqlmodel import Session, SQLModel, select

from ferrylink.api_app import build_api
from ferrylink.config import read_config_version
from ferrylink.contracts import JOB_PARAMS, MaintenanceRun
from ferrylink.db import create_tables, make_engine
from ferrylink.models import (
    DeadEvent,
    EventClaim,
    JobRun,
    OutboxMessage,
    ProcessedEvent,
    ScheduledFile,
    ScheduledJob,
    SentinelCycle,
    SentinelDelivery,
    SentinelEndpoint,
    SentinelLeg,
    SentinelRecord,
    StepRun,
    Transfer,
)
from ferrylink.paths import sentinel_link_db
from services.scheduler.api import JobStore, routers
from services.scheduler.defaults import DEFAULT_JOBS, DefaultJob, seed_default_jobs
from services.scheduler.jobs import job_params, run_event
from services.transaction_manager import claims, purges
from services.transaction_manager.handlers import EventHandler
from services.transaction_manager.routing import RouteRunner
from services.transaction_manager.transfer_log import TransferLog
from tests.admin_support import admin_headers

pytest_plugins = ["tests.scheduling_fixtures"]

FIRE = datetime(2025, 6, 1, 3, 0, tzinfo=UTC)
DAYS = 30
CUTOFF = FIRE - timedelta(days=DAYS)
OLD = CUTOFF - timedelta(days=1)  # older than the cutoff
NEW = CUTOFF + timedelta(hours=1)  # younger
BOTH = pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)


def add(engine: Engine, *rows: SQLModel) -> None:
    with Session(engine) as session:
        for row in rows:
            session.add(row)
        session.commit()


def keys(engine: Engine, column: Any) -> list[Any]:
    with Session(engine) as session:
        return sorted(session.exec(select(column)).all())


def run_job(engine: Engine, data_dir: Path, kind: str, state_dir: Path | None = None,
            **params: Any) -> JobRun:  # fmt: skip
    """A maintenance job fired at FIRE, handled by the transaction manager's event handler;
    its job run afterwards."""
    job = ScheduledJob(name=f"{kind}-job", kind=kind, cron="0 3 * * *", start_at=FIRE,
                       params_json=json.dumps({"days": DAYS, **params}))  # fmt: skip
    add(engine, job)
    with Session(engine) as session:
        job = session.exec(select(ScheduledJob).where(ScheduledJob.name == f"{kind}-job")).one()
    event = run_event(job, FIRE)
    assert isinstance(event, MaintenanceRun) and job.id is not None
    add(engine, JobRun(job_id=job.id, fire_time=FIRE, status="submitted", node_id="st1",
                       event_id=event.id, event_json=event.model_dump_json()))  # fmt: skip

    def publish(message: Any) -> Future[None]:
        raise AssertionError("a purge publishes nothing")

    routes = RouteRunner(engine, data_dir, TransferLog(publish, "st1"), "st1")
    handler = EventHandler(engine, "st1", routes, data_dir, publish, state_dir=state_dir)
    assert handler.handle(event) is True
    assert handler.handle(event) is False  # a repeat does nothing
    with Session(engine) as session:
        run = session.exec(select(JobRun).where(JobRun.event_id == event.id)).one()
        assert session.get(EventClaim, event.id) is None  # no claim left behind
    return run


# -- job runs --------------------------------------------------------------------------------------


@BOTH
def test_job_run_purge_removes_old_finished_runs_but_each_jobs_latest(
    engine: Engine, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(purges, "BATCH", 2)  # several batches

    def run(job_id: int, fired: datetime, status: str) -> JobRun:
        return JobRun(job_id=job_id, fire_time=fired, status=status, node_id="st1",
                      event_id=f"j{job_id}-{fired:%Y%m%d%H%M}")  # fmt: skip

    hour = timedelta(hours=1)
    add(
        engine,
        # job 101: old finished runs go (5 of them, over three batches) ...
        *(run(101, OLD - n * hour, status) for n, status in
          enumerate(["submitted", "done", "missed", "done", "submitted"], start=1)),
        run(101, OLD, "claimed"),  # ... not one whose event is not confirmed yet
        run(101, NEW, "done"),  # ... nor a recent one
        # job 102: all old, the latest stays (the scheduler resumes after it)
        run(102, OLD - 2 * hour, "done"),
        run(102, OLD - hour, "done"),
    )  # fmt: skip
    result = run_job(engine, data_dir, "job_run_purge")

    with Session(engine) as session:
        left = session.exec(select(JobRun.job_id, JobRun.fire_time, JobRun.status)).all()
    assert sorted((j, s) for j, _f, s in left if j in (101, 102)) == [
        (101, "claimed"), (101, "done"), (102, "done")
    ]  # fmt: skip
    assert (result.status, result.removed, result.result) == ("done", 6, "job_run 6")
    assert result.finished_at is not None


# -- scheduled files -------------------------------------------------------------------------------


@BOTH
def test_scheduled_file_purge_removes_only_versions_gone_at_their_source(
    engine: Engine, data_dir: Path
) -> None:
    add(engine, ScheduledJob(id=7, name="pull-bank", kind="pull", interval_seconds=60,
                             start_at=FIRE))  # fmt: skip

    def record(name: str, job: int, direction: str, status: str, done: datetime) -> ScheduledFile:
        arrived = f"a-{name}" if direction == "pull" else None
        return ScheduledFile(job_id=str(job), partner="bank", direction=direction, name=name,
                             size=1, mtime=1.0, status=status, event_id="e", done_at=done,
                             arrived_event_id=arrived)  # fmt: skip

    add(
        engine,
        record("removed-at-partner", 7, "pull", "removed", OLD),  # gone at its source
        record("deleted-locally", 7, "push", "deleted", OLD),  # gone at its source
        record("still-at-partner", 7, "pull", "published", OLD),  # would be fetched again
        record("still-local", 7, "push", "sent", OLD),  # would be sent again
        record("recent-removed", 7, "pull", "removed", NEW),
        record("deleted-job-published", 99, "pull", "published", OLD),  # no run will look
        record("deleted-job-fetched", 99, "pull", "fetched", OLD),  # never announced: kept
    )
    result = run_job(engine, data_dir, "scheduled_file_purge")
    assert keys(engine, ScheduledFile.name) == [
        "deleted-job-fetched", "recent-removed", "still-at-partner", "still-local",
    ]  # fmt: skip
    assert (result.removed, result.result) == (3, "scheduled_file 3")


# -- event records ---------------------------------------------------------------------------------


@BOTH
def test_event_claim_purge_keeps_what_a_copy_that_may_come_needs(
    engine: Engine, data_dir: Path
) -> None:
    old, new = OLD.timestamp(), NEW.timestamp()

    def processed(event_id: str, at: float, steps: int = 2) -> list[SQLModel]:
        rows: list[SQLModel] = [ProcessedEvent(event_id=event_id, kind="file.arrived",
                                               node_id="st1", processed_at=at)]  # fmt: skip
        finished = datetime.fromtimestamp(at, UTC)
        rows += [StepRun(event_id=event_id, step_index=i, status="done", finished_at=finished)
                 for i in range(steps)]  # fmt: skip
        return rows

    add(
        engine,
        *processed("done-long-ago", old),  # goes, with its two step runs
        *processed("done-recently", new),
        *processed("dead-lettered-copy", old),  # a kept dead letter may be replayed
        DeadEvent(id="dead-lettered-copy", queue="q", body=b"{}"),
        *processed("run-not-confirmed", old),  # its job run is published again
        JobRun(job_id=5, fire_time=OLD, status="claimed", node_id="st1",
               event_id="run-not-confirmed"),
        *processed("in-the-outbox", old),  # the relay publishes it again
        OutboxMessage(routing_key="p.events", body=b"{}", message_id="in-the-outbox",
                      created_at=time.time()),
        *processed("fetched-not-announced", old),  # its file.arrived is published again
        ScheduledFile(job_id="5", partner="bank", direction="pull", name="f", size=1,
                      mtime=1.0, status="fetched", event_id="r",
                      arrived_event_id="fetched-not-announced"),
        *processed("failed-may-be-resubmitted", old),  # resumes from its step runs
        Transfer(leg_key="failed-may-be-resubmitted:route", cycle_id="c", leg="route",
                 event_id="failed-may-be-resubmitted", direction="internal", account="acme",
                 file_name="f", protocol="file", status="FAILED", node_id="st1"),
        # claims: expired long ago (no owner for the age) goes; held and recent stay
        EventClaim(event_id="claim-expired-long-ago", owner="x", expires_at=old, attempts=5),
        EventClaim(event_id="claim-held", owner="y", expires_at=time.time() + 3600),
        # step runs of events never completed
        StepRun(event_id="abandoned", step_index=0, finished_at=OLD),  # no claim, nothing
        StepRun(event_id="dead-half-done", step_index=0, finished_at=OLD),  # its dead letter
        DeadEvent(id="dead-half-done", queue="q", body=b"{}"),
        StepRun(event_id="claim-expired-long-ago", step_index=0, finished_at=OLD),
        StepRun(event_id="claim-held", step_index=0, finished_at=OLD),
    )  # fmt: skip
    # A claim released now (after a failure) is recent on the database clock: kept.
    assert claims.take(engine, "claim-released", "z", 60)
    claims.release(engine, "claim-released", "z")

    result = run_job(engine, data_dir, "event_claim_purge")
    assert keys(engine, ProcessedEvent.event_id) == sorted([
        "dead-lettered-copy", "done-recently", "failed-may-be-resubmitted",
        "fetched-not-announced", "in-the-outbox", "run-not-confirmed",
        result.event_id,  # the purge's own run, completed after it
    ])  # fmt: skip
    assert keys(engine, EventClaim.event_id) == ["claim-held", "claim-released"]
    with Session(engine) as session:
        steps = session.exec(select(StepRun.event_id)).all()
    assert sorted(set(steps)) == [
        "claim-held", "dead-half-done", "dead-lettered-copy", "done-recently",
        "failed-may-be-resubmitted", "fetched-not-announced", "in-the-outbox",
        "run-not-confirmed",
    ]  # fmt: skip
    assert result.removed == 1 + 2 + 1 + 2  # processed, its steps, a claim, two orphan steps
    assert result.result == "processed_event 1, step_run 4, event_claim 1"


def test_a_released_claim_is_taken_again_at_once(engine: Engine) -> None:
    """A release dates the claim (for the purge) and still lets the next copy in."""
    assert claims.take(engine, "e", "first", 60)
    assert not claims.take(engine, "e", "second", 60)
    claims.release(engine, "e", "first")
    assert claims.take(engine, "e", "second", 60)
    assert claims.count_failure(engine, "e", "second", "boom") == 1
    assert claims.take(engine, "e", "third", 60)


# -- the outbox ------------------------------------------------------------------------------------


@BOTH
def test_outbox_purge_parks_messages_never_published_as_dead_letters(
    engine: Engine, data_dir: Path
) -> None:
    add(
        engine,
        OutboxMessage(routing_key="p.events.gone", body=b'{"stuck": 1}', message_id="stuck",
                      headers_json='{"h": 1}', created_at=OLD.timestamp()),
        OutboxMessage(routing_key="p.transfer-states", body=b"{}",
                      message_id="e" * 60 + ":route:ROUTED", created_at=OLD.timestamp()),
        OutboxMessage(routing_key="p.events", body=b"{}", message_id="known",
                      created_at=OLD.timestamp()),
        DeadEvent(id="known", queue="p.events", body=b"{}", reason="its own"),
        OutboxMessage(routing_key="p.events", body=b"{}", message_id="fresh",
                      created_at=NEW.timestamp()),
    )  # fmt: skip
    result = run_job(engine, data_dir, "outbox_purge", days=DAYS)
    assert keys(engine, OutboxMessage.message_id) == ["fresh"]
    with Session(engine) as session:
        dead = {d.id: d for d in session.exec(select(DeadEvent)).all()}
    assert dead["stuck"].queue == "p.events.gone" and dead["stuck"].body == b'{"stuck": 1}'
    assert dead["stuck"].reason.startswith("outbox: never published to p.events.gone since")
    assert json.loads(dead["stuck"].headers_json) == {"h": 1}
    assert dead["known"].reason == "its own"  # already a dead letter: left as it was
    long_id = [k for k in dead if k.startswith("sha256-")]
    assert len(long_id) == 1 and len(long_id[0]) == 64
    assert (result.removed, result.result) == (3, "outbox 3")


# -- sentinel link data ----------------------------------------------------------------------------


def link_cycle(cycle: str, linked: float, first_pos: int) -> list[SQLModel]:
    """A cycle of two records, at positions `first_pos` and the next in the record log."""
    rows: list[SQLModel] = [SentinelCycle(cycle_id=cycle, next_seq=3, updated_at=linked)]
    for seq, status in ((1, "RECEIVED"), (2, "ROUTED")):
        leg = "receive" if seq == 1 else "route"
        rows.append(SentinelLeg(leg_key=f"{cycle}:{leg}", cycle_id=cycle, status=status,
                                seq=seq, updated_at=linked))  # fmt: skip
        rows.append(SentinelRecord(id=f"{cycle}:{leg}:{status}", cycle_id=cycle, seq=seq,
                                   body_json="{}", linked_at=linked,
                                   pos=first_pos + seq - 1))  # fmt: skip
    return rows


@BOTH
def test_sentinel_link_purge_removes_quiet_cycles_every_endpoint_got(
    engine: Engine, data_dir: Path, tmp_path: Path
) -> None:
    old, new = OLD.timestamp(), NEW.timestamp()
    add(
        engine,
        *link_cycle("failed-may-be-resubmitted", old, 1),  # a resubmit goes on numbering
        Transfer(leg_key="x:route", cycle_id="failed-may-be-resubmitted", leg="route",
                 event_id="x", direction="internal", account="acme", file_name="f",
                 protocol="file", status="FAILED", node_id="st1"),
        *link_cycle("delivered-long-ago", old, 3),
        *link_cycle("still-queued", old, 5),  # the endpoint has not got its second record
        *link_cycle("recent", new, 7),
        SentinelEndpoint(id=1, name="tracking", url="http://127.0.0.1:1/"),
        SentinelDelivery(endpoint_id=1, through_pos=5),
        # A deleted endpoint's row holds nothing back.
        SentinelDelivery(endpoint_id=99, through_pos=0),
    )  # fmt: skip
    # passive_legacy: this server's own link data, in its own file
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    local = make_engine(f"sqlite:///{sentinel_link_db(state_dir, 'st1')}")
    create_tables(local)
    add(local, *link_cycle("local-delivered", old, 1), *link_cycle("local-recent", new, 3))

    result = run_job(engine, data_dir, "sentinel_link_purge", state_dir=state_dir)
    kept = ["failed-may-be-resubmitted", "recent", "still-queued"]
    assert keys(engine, SentinelCycle.cycle_id) == kept
    assert sorted(set(keys(engine, SentinelRecord.cycle_id))) == kept
    assert sorted(set(keys(engine, SentinelLeg.cycle_id))) == kept
    assert keys(local, SentinelCycle.cycle_id) == ["local-recent"]
    assert sorted(set(keys(local, SentinelRecord.cycle_id))) == ["local-recent"]
    local.dispose()
    assert result.removed == 2 * (1 + 2 + 2)
    assert result.result == "sentinel_record 4, sentinel_leg 4, sentinel_cycle 2"


# -- parameters, the run's report, the default jobs ------------------------------------------------


@pytest.mark.parametrize(
    "kind",
    ["job_run_purge", "scheduled_file_purge", "event_claim_purge", "outbox_purge",
     "sentinel_link_purge"],
)  # fmt: skip
def test_the_age_is_a_whole_number_of_days_within_bounds(kind: str) -> None:
    assert JOB_PARAMS.validate_python({"kind": kind, "days": 1}).days == 1  # type: ignore[union-attr]
    for bad in (0, -3, 3651, "soon", 1.5):
        with pytest.raises(ValidationError):
            JOB_PARAMS.validate_python({"kind": kind, "days": bad})
    with pytest.raises(ValidationError, match="extra"):
        JOB_PARAMS.validate_python({"kind": kind, "days": 3, "batch": 5})


def test_the_job_run_reports_what_was_removed_on_the_api(engine: Engine, data_dir: Path) -> None:
    add(engine, OutboxMessage(routing_key="p.gone", body=b"{}", message_id="m",
                              created_at=OLD.timestamp()))  # fmt: skip
    run = run_job(engine, data_dir, "outbox_purge", days=DAYS)
    app = build_api(title="scheduler", engine=engine, routers=routers,
                    service=JobStore(data_dir, default_grace=60.0))  # fmt: skip
    with TestClient(app, headers=admin_headers(engine)) as client:
        runs = client.get(f"/jobs/{run.job_id}/runs").json()["items"]
    assert [(r["status"], r["removed"], r["result"]) for r in runs] == [("done", 1, "outbox 1")]
    assert runs[0]["finished_at"] is not None


def jobs(engine: Engine) -> dict[str, ScheduledJob]:
    with Session(engine) as session:
        return {job.name: job for job in session.exec(select(ScheduledJob)).all()}


@BOTH
def test_default_jobs_are_created_once_and_not_again_once_deleted(engine: Engine) -> None:
    version = read_config_version(engine)
    created = seed_default_jobs(engine, 60.0)
    assert created == [job.name for job in DEFAULT_JOBS]
    assert read_config_version(engine) == version + 1
    made = jobs(engine)
    # A purge for every table that grows, each a valid job of its kind.
    assert sorted(job_params(made[name]).kind for name in created) == sorted([
        "transfer_log_purge", "audit_log_purge", "dead_letter_purge", "job_run_purge",
        "scheduled_file_purge", "event_claim_purge", "outbox_purge", "sentinel_link_purge",
    ])  # fmt: skip
    assert all(made[name].cron and made[name].enabled for name in created)

    assert seed_default_jobs(engine, 60.0) == []  # every scheduler start: nothing more
    with Session(engine) as session:
        session.delete(session.get(ScheduledJob, made["purge-job-runs"].id))
        session.commit()
    assert seed_default_jobs(engine, 60.0) == []  # deleted by an administrator: stays so
    assert "purge-job-runs" not in jobs(engine)
    later = (*DEFAULT_JOBS, DefaultJob("purge-something-new", DEFAULT_JOBS[0].params, "0 4 * * *"))
    assert seed_default_jobs(engine, 60.0, later) == ["purge-something-new"]
    assert read_config_version(engine) == version + 2


def test_schedulers_starting_together_create_the_default_jobs_once(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    engine = make_engine(url)
    create_tables(engine)
    results: list[list[str]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def start() -> None:
        own = make_engine(url)  # as separate processes would
        try:
            barrier.wait()
            results.append(seed_default_jobs(own, 60.0))
        except BaseException as exc:
            errors.append(exc)
        finally:
            own.dispose()

    threads = [threading.Thread(target=start) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors
    assert sorted(len(r) for r in results) == [0, 0, len(DEFAULT_JOBS)]
    assert len(jobs(engine)) == len(DEFAULT_JOBS)
    engine.dispose()
