"""The scheduler: triggers (cron, interval, time zones), runs keyed by (job id, fire time),
missed fire times after a promotion, the HTTP API, and a job due every 2 s on a 3-server
cluster across a primary kill and a fail-back, pulling from a real SFTP server.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from ferrylink.api_app import build_api
from ferrylink.cluster import WORK_SCHEDULER
from ferrylink.contracts import (
    DeadLetterPurge,
    MaintenanceRun,
    PullJob,
    TransferScheduled,
)
from ferrylink.models import JobRun, ProcessedEvent, ScheduledFile, ScheduledJob, Transfer
from services.scheduler.api import JobStore, routers
from services.scheduler.jobs import (
    JobError,
    check_params,
    cron_trigger,
    first_due,
    make_trigger,
    next_fire_time,
    run_event,
    time_zone,
)
from services.scheduler.runner import JobScheduler
from tests.admin_support import admin_headers
from tests.cluster_support import Cluster
from tests.helpers import wait_until
from tests.scheduling_support import (
    EventQueue,
    add_account,
    add_partner,
    api,
    cluster_data_dir,
    cluster_engine,
    post,
)
from tests.sftp_server import SftpServer

pytest_plugins = ["tests.scheduling_fixtures"]

UTC_ZONE = time_zone("UTC")


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


# --------------------------------------------------------------------------------------------
# Triggers (pure)
# --------------------------------------------------------------------------------------------


def test_cron_means_what_crontab_means() -> None:
    saturday = at("2024-06-01T12:00:00")

    def next_after(expression: str, zone: str = "UTC", moment: datetime = saturday) -> datetime:
        fire = next_fire_time(cron_trigger(expression, time_zone(zone)), moment)
        assert fire is not None
        return fire

    # Weekdays count from Sunday = 0 (and 7), as in crontab (APScheduler 3 alone would not).
    assert next_after("0 9 * * 1") == at("2024-06-03T09:00:00")  # Monday
    assert next_after("0 9 * * 0") == at("2024-06-02T09:00:00")  # Sunday
    assert next_after("0 9 * * 7") == at("2024-06-02T09:00:00")
    assert next_after("0 9 * * 1-5") == at("2024-06-03T09:00:00")
    assert next_after("0 9 * * */2") == at("2024-06-02T09:00:00")  # sun, tue, thu, sat
    assert next_after("0 13 * * 6") == at("2024-06-01T13:00:00")  # Saturday
    assert next_after("0 9 * * mon-fri") == at("2024-06-03T09:00:00")
    # 6 fields: seconds first.
    assert next_after("*/5 * * * * *") == at("2024-06-01T12:00:00")
    assert next_after("*/5 * * * * *", moment=saturday + timedelta(seconds=1)) == at(
        "2024-06-01T12:00:05"
    )
    # Time zones, daylight saving time included: 02:00 in Paris is 01:00 UTC in winter and
    # 00:00 UTC in summer.
    assert next_after("0 2 * * *", "Europe/Paris", at("2024-01-10T12:00:00")) == at(
        "2024-01-11T01:00:00"
    )
    assert next_after("0 2 * * *", "Europe/Paris", at("2024-07-10T12:00:00")) == at(
        "2024-07-11T00:00:00"
    )


def test_bad_triggers_are_refused_with_the_reason() -> None:
    cases = {
        ("* * *", None, "UTC"): "has 3 fields",
        ("61 * * * *", None, "UTC"): "bad cron expression '61 * * * *'",
        ("0 9 * * 5-1", None, "UTC"): "runs backwards",
        ("0 9 * * funday", None, "UTC"): "bad cron expression",
        ("0 9 * * *", None, "Mars/Olympus"): "unknown time zone 'Mars/Olympus'",
        ("0 9 * * *", 60, "UTC"): "exactly one",
        (None, None, "UTC"): "exactly one",
        (None, 0, "UTC"): "at least 1",
    }
    for (cron, interval, zone), reason in cases.items():
        with pytest.raises(JobError) as error:
            make_trigger(cron, interval, zone, at("2024-01-01T00:00:00"))
        assert reason in str(error.value), (cron, interval, zone, str(error.value))


def make_job(**fields: Any) -> ScheduledJob:
    values: dict[str, Any] = {
        "id": 7, "name": "nightly", "kind": "dead_letter_purge", "interval_seconds": 10,
        "start_at": at("2024-01-01T00:00:03"), "params_json": json.dumps({"days": "30"}),
        "misfire_grace_seconds": 60.0, "updated_at": at("2024-01-01T00:00:00"),
    }  # fmt: skip
    values.update(fields)
    return ScheduledJob(**values)


def test_where_a_started_scheduler_resumes_a_job() -> None:
    job = make_job()
    trigger = make_trigger(None, 10, "UTC", job.start_at)
    now = at("2024-01-01T01:00:00")
    # Interval fire times count from start_at, whoever computes them.
    assert next_fire_time(trigger, at("2024-01-01T00:59:55")) == at("2024-01-01T01:00:03")
    # After the last run; a missed one within the grace (60 s) still runs.
    assert first_due(job, trigger, at("2024-01-01T00:59:33"), now) == at("2024-01-01T00:59:43")
    # Older ones are past their grace: resume with the first within it.
    assert first_due(job, trigger, at("2024-01-01T00:30:03"), now) == at("2024-01-01T00:59:03")
    # Never before the job's last change (created, edited, resumed).
    changed = make_job(updated_at=at("2024-01-01T00:59:50"))
    assert first_due(changed, trigger, None, now) == at("2024-01-01T00:59:53")


def test_a_run_event_is_the_same_for_the_same_fire_time() -> None:
    job = make_job()
    fire = at("2024-01-01T00:00:13")
    first, again = run_event(job, fire), run_event(job, fire)
    assert first.id == again.id == "job7-20240101T000013Z" == first.cycle_id
    assert first.kind == "maintenance.run"
    assert isinstance(first, MaintenanceRun)
    assert first.task == DeadLetterPurge(days=30)
    assert (first.job_id, first.job_name, first.fire_time) == (7, "nightly", fire)
    assert run_event(job, fire + timedelta(seconds=10)).id != first.id
    pull = make_job(kind="pull", params_json=json.dumps({"partner": "bank", "account": "acme",
                                                         "folder": "in"}))  # fmt: skip
    pulled = run_event(pull, fire)
    assert isinstance(pulled, TransferScheduled)
    assert pulled.job == PullJob(partner="bank", account="acme", folder="in")


def test_job_parameters_are_checked(engine: Engine, data_dir: Path) -> None:
    add_account(engine, data_dir)
    add_partner(engine)
    with Session(engine) as session:

        def check(kind: str, params: dict[str, Any]) -> dict[str, Any]:
            return check_params(kind, params, session, data_dir)

        assert check("transfer_log_purge", {}) == {"days": 30}
        assert check("pull", {"partner": "bank", "account": "acme", "folder": "in/",
                              "delete_remote": True}) == {
            "partner": "bank", "account": "acme", "folder": "in", "pattern": "*",
            "delete_remote": True,
        }  # fmt: skip
        assert check("temp_file_cleanup", {"folder": str(data_dir / "homes")})["folder"] == (
            "homes"
        )
        refused = {
            ("pull", (("account", "acme"),)): "needs the parameter 'partner'",
            ("pull", (("partner", "nobody"), ("account", "acme"))): "unknown partner",
            ("push", (("partner", "bank"), ("account", "x"))): "unknown account",
            ("pull", (("partner", "bank"), ("account", "acme"), ("folder", "../.."))): "'..'",
            ("temp_file_cleanup", (("folder", "/etc"),)): "outside the data directory",
            ("transfer_log_archive", (("folder", "../x"),)): "'..'",
            ("transfer_log_purge", (("days", "0"),)): "greater than 0",
            ("transfer_log_purge", (("days", "soon"),)): "valid integer",
            ("transfer_log_purge", (("weeks", "1"),)): "unknown parameter 'weeks'",
            ("temp_file_cleanup", (("patterns", "*"),)): "would match every file",
            ("pull", (("partner", "bank"), ("account", "acme"), ("pattern", "a/*"))): "'/'",
            ("archive", ()): "unknown job kind",
        }
        for (kind, params), reason in refused.items():
            with pytest.raises(JobError) as error:
                check(kind, dict(params))
            assert reason in str(error.value), (kind, params, str(error.value))


# --------------------------------------------------------------------------------------------
# The running scheduler: APScheduler, a real broker, a database
# --------------------------------------------------------------------------------------------


def add_job(engine: Engine, **fields: Any) -> int:
    now = datetime.now(UTC).replace(microsecond=0)
    values: dict[str, Any] = {
        "name": "every-second", "kind": "dead_letter_purge", "interval_seconds": 1,
        "start_at": now - timedelta(hours=1), "params_json": json.dumps({"days": "30"}),
        "misfire_grace_seconds": 30.0, "coalesce": False, "updated_at": now,
    }  # fmt: skip
    values.update(fields)
    with Session(engine) as session:
        job = ScheduledJob(**values)
        session.add(job)
        session.commit()
        assert job.id is not None
        return job.id


def runs(engine: Engine, job_id: int) -> list[JobRun]:
    with Session(engine) as session:
        return list(
            session.exec(
                select(JobRun).where(JobRun.job_id == job_id).order_by(col(JobRun.fire_time))
            ).all()
        )


def assert_consecutive(fire_times: list[datetime], step: float) -> None:
    gaps = [(b - a).total_seconds() for a, b in zip(fire_times, fire_times[1:], strict=False)]
    assert gaps == [step] * len(gaps), gaps


@pytest.fixture
def schedulers(engine: Engine, event_queue: EventQueue) -> Iterator[Any]:
    started: list[JobScheduler] = []

    def make(node: str, **options: Any) -> JobScheduler:
        scheduler = JobScheduler(engine, node, event_queue.publish, sync_interval=0.2, **options)
        started.append(scheduler)
        return scheduler

    yield make
    for scheduler in started:
        scheduler.stop()


@pytest.mark.parametrize("engine", ["sqlite", "postgresql"], indirect=True)
def test_two_schedulers_at_once_still_run_each_fire_time_once(
    engine: Engine, event_queue: EventQueue, schedulers: Any
) -> None:
    """An overlap the coordinator prevents anyway: the (job id, fire time) key alone keeps
    every fire time to one run."""
    job_id = add_job(engine)
    first, second = schedulers("st1"), schedulers("st2")
    first.start()
    second.start()

    def submitted() -> int:
        return sum(r.status == "submitted" for r in runs(engine, job_id))

    wait_until(lambda: submitted() >= 5, 20, "5 runs submitted")
    first.stop()
    second.stop()
    done = runs(engine, job_id)
    fire_times = [r.fire_time for r in done]
    assert len(set(fire_times)) == len(fire_times)
    assert_consecutive(fire_times, 1.0)
    wait_until(lambda: all(r.status == "submitted" for r in runs(engine, job_id)), 10)
    events = event_queue.drain()
    assert sorted(e.id for e in events) == sorted(r.event_id for r in done)
    assert all(isinstance(e, MaintenanceRun) and isinstance(e.task, DeadLetterPurge)
               for e in events)  # fmt: skip


@pytest.mark.parametrize("coalesce", [False, True])
def test_fire_times_missed_during_a_failover_run_once_within_the_grace(
    engine: Engine, event_queue: EventQueue, schedulers: Any, coalesce: bool
) -> None:
    now = datetime.now(UTC).replace(microsecond=0)
    job_id = add_job(engine, misfire_grace_seconds=4.0, coalesce=coalesce,
                     updated_at=now - timedelta(minutes=5))  # fmt: skip
    # The old primary ran the job up to 10 s ago, then died.
    last = now - timedelta(seconds=10)
    with Session(engine) as session:
        session.add(JobRun(job_id=job_id, fire_time=last, status="submitted", node_id="st1",
                           event_id="old"))  # fmt: skip
        session.commit()

    promoted = schedulers("st2")
    started = datetime.now(UTC)
    promoted.start()
    wait_until(lambda: len(runs(engine, job_id)) >= 4, 15, "runs after the promotion")
    promoted.stop()

    new = [r for r in runs(engine, job_id) if r.fire_time > last]
    assert all(r.node_id == "st2" and r.status in ("claimed", "submitted") for r in new)
    missed_window = [r for r in new if r.fire_time <= started]
    # Older than the grace when the scheduler started: not run. Within it: run.
    assert all(r.fire_time >= started - timedelta(seconds=5) for r in new)
    if coalesce:
        assert len(missed_window) == 1  # all of them, once, as the latest
        assert missed_window[0].fire_time >= started - timedelta(seconds=1)
    else:
        assert len(missed_window) >= 3  # each one within 4 s of grace
        assert missed_window[0].fire_time <= started - timedelta(seconds=3)
        assert_consecutive([r.fire_time for r in new], 1.0)


def test_a_run_claimed_but_never_confirmed_is_published_again(
    engine: Engine, event_queue: EventQueue, schedulers: Any
) -> None:
    job_id = add_job(engine, enabled=False)
    fire = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=1)
    event = MaintenanceRun(id="job-x-20240101T000000Z", job_id=job_id, fire_time=fire,
                           task=DeadLetterPurge(days=30))  # fmt: skip
    with Session(engine) as session:
        session.add(JobRun(job_id=job_id, fire_time=fire, status="claimed", node_id="st1",
                           event_id=event.id, event_json=event.model_dump_json(),
                           claimed_at=fire))  # fmt: skip
        session.commit()
    schedulers("st2", republish_after=0.5).start()
    wait_until(lambda: runs(engine, job_id)[0].status == "submitted", 10, "republished")
    assert [e.id for e in event_queue.drain()] == [event.id]


def test_stopped_paused_and_deleted_jobs_run_no_more(
    engine: Engine, event_queue: EventQueue, schedulers: Any
) -> None:
    paused_id = add_job(engine, name="paused")
    deleted_id = add_job(engine, name="deleted")
    clock_id = add_job(engine, name="clock")  # keeps running: its runs mark time passing
    scheduler = schedulers("st1")
    scheduler.start()
    wait_until(lambda: runs(engine, paused_id) and runs(engine, deleted_id), 10)
    with Session(engine) as session:
        paused = session.get(ScheduledJob, paused_id)
        assert paused is not None
        paused.enabled, paused.version = False, paused.version + 1
        session.add(paused)
        deleted = session.get(ScheduledJob, deleted_id)
        session.delete(deleted)
        session.commit()
    # Once the scheduler re-read the table, neither runs again (a claim already under way
    # then may still finish: hence the fifth of a second).
    wait_until(lambda: not scheduler.loaded() & {paused_id, deleted_id}, 10, "jobs unloaded")
    unloaded = datetime.now(UTC)

    def clock_ticks() -> int:
        return sum(1 for r in runs(engine, clock_id) if r.claimed_at > unloaded)

    # Proving an absence takes time: wait until two more fire times ran for the clock job.
    wait_until(lambda: clock_ticks() >= 2, 10, "two more fire times")
    later = [r for r in runs(engine, paused_id) + runs(engine, deleted_id)
             if r.claimed_at > unloaded + timedelta(seconds=0.2)]  # fmt: skip
    assert later == []

    running_id = add_job(engine, name="running")
    wait_until(lambda: runs(engine, running_id), 10, "the new job's first run")
    scheduler.stop()
    stopped = datetime.now(UTC)
    assert not scheduler.running
    time.sleep(2.5)  # two more fire times pass: none is claimed by a stopped scheduler
    assert all(r.claimed_at < stopped for r in runs(engine, running_id))


# --------------------------------------------------------------------------------------------
# HTTP API
# --------------------------------------------------------------------------------------------


@pytest.fixture
def client(engine: Engine, data_dir: Path) -> Iterator[TestClient]:
    app = build_api(title="scheduler", engine=engine, routers=routers,
                    service=JobStore(data_dir, default_grace=45.0))  # fmt: skip
    with TestClient(app, headers=admin_headers(engine)) as test_client:
        yield test_client


def test_api_creates_lists_pauses_and_deletes_jobs(
    client: TestClient, engine: Engine, data_dir: Path
) -> None:
    add_account(engine, data_dir)
    add_partner(engine)
    created = client.post("/jobs", json={
        "name": "nightly-pull", "kind": "pull", "cron": "0 2 * * *", "timezone": "Europe/Paris",
        "params": {"partner": "bank", "account": "acme", "folder": "in", "delete_remote": True},
    })  # fmt: skip
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["params"] == {"partner": "bank", "account": "acme", "folder": "in",
                             "pattern": "*", "delete_remote": True}  # fmt: skip
    assert job["misfire_grace_seconds"] == 45.0 and job["last_run"] is None
    next_run = datetime.fromisoformat(job["next_run"])
    assert next_run > datetime.now(UTC)
    assert next_run.astimezone(time_zone("Europe/Paris")).hour == 2

    interval = client.post("/jobs", json={"name": "purge", "kind": "transfer_log_purge",
                                          "interval_seconds": 3600,
                                          "params": {"days": 7}}).json()  # fmt: skip
    assert [j["name"] for j in client.get("/jobs").json()["items"]] == ["nightly-pull", "purge"]

    # Last run: the newest recorded one; next run: after it.
    fire = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=30)
    with Session(engine) as session:
        for seconds in (3600, 0):
            fire_time = fire - timedelta(seconds=seconds)
            session.add(JobRun(job_id=interval["id"], fire_time=fire_time, status="submitted",
                               node_id="st2", event_id=f"e{seconds}"))  # fmt: skip
        session.commit()
    got = client.get(f"/jobs/{interval['id']}").json()
    assert datetime.fromisoformat(got["last_run"]["fire_time"]) == fire
    assert got["last_run"]["node_id"] == "st2" and got["last_run"]["status"] == "submitted"
    assert datetime.fromisoformat(got["next_run"]) > datetime.now(UTC)
    assert [r["event_id"] for r in client.get(f"/jobs/{interval['id']}/runs").json()["items"]] == [
        "e0", "e3600",
    ]  # fmt: skip

    paused = client.post(f"/jobs/{job['id']}/pause").json()
    assert paused["enabled"] is False and paused["next_run"] is None
    with Session(engine) as session:
        assert session.get(ScheduledJob, job["id"]).version == 2  # type: ignore[union-attr]
    resumed = client.post(f"/jobs/{job['id']}/resume").json()
    assert resumed["enabled"] is True and resumed["next_run"] == job["next_run"]

    assert client.delete(f"/jobs/{interval['id']}").status_code == 204
    assert client.get(f"/jobs/{interval['id']}").status_code == 404
    assert runs(engine, interval["id"]) == []
    duplicate = client.post("/jobs", json={"name": "nightly-pull", "kind": "dead_letter_purge",
                                           "cron": "0 3 * * *"})  # fmt: skip
    assert duplicate.status_code == 409 and "exists" in duplicate.text


def test_api_refuses_bad_jobs_with_the_reason(
    client: TestClient, engine: Engine, data_dir: Path
) -> None:
    add_account(engine, data_dir)
    base = {"name": "j", "kind": "temp_file_cleanup", "cron": "0 3 * * *"}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"cron": "0 3 * *"}, "has 4 fields"),
        ({"cron": "0 25 * * *"}, "bad cron expression"),
        ({"timezone": "Europe/Atlantis"}, "unknown time zone"),
        ({"interval_seconds": 60}, "exactly one"),
        ({"params": {"folder": "/etc"}}, "outside the data directory"),
        ({"params": {"folder": "../../etc"}}, "may not contain '..'"),
        ({"kind": "pull", "params": {"partner": "bank", "account": "acme"}}, "unknown partner"),
        ({"params": {"max_age_hours": -1}}, "greater than 0"),
    ]
    for change, reason in cases:
        response = client.post("/jobs", json={**base, **change})
        assert response.status_code == 422, (change, response.text)
        assert reason in response.json()["error"]["message"], (change, response.text)
    assert client.post("/jobs", json={**base, "kind": "compress"}).status_code == 422
    assert (
        client.post("/jobs", json={**base, "interval_seconds": 0, "cron": None}).status_code == 422
    )
    assert client.post("/jobs/42/pause").status_code == 404
    assert client.get("/jobs").json()["items"] == []


# --------------------------------------------------------------------------------------------
# A 3-server cluster: a pull every 2 s across a primary kill and a fail-back
# --------------------------------------------------------------------------------------------


@pytest.mark.fault
@pytest.mark.timeout(300)
def test_a_job_every_2s_runs_once_per_fire_time_across_a_kill_and_a_fail_back(
    make_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRYLINK_PARTNER_ALLOW", "127.0.0.1")  # the test partner's address
    remote = tmp_path / "remote"
    with SftpServer(remote, password="partner-secret") as server:
        cluster: Cluster = make_cluster("passive")
        wait_until(lambda: WORK_SCHEDULER in cluster.active("st1", "scheduler"), 60,
                   "st1 running the scheduler")  # fmt: skip
        tm = api(cluster, "st2", "transaction-manager")
        post(cluster, f"{tm}/accounts", {"name": "acme", "password": "a-long-password"})
        post(cluster, f"{tm}/partners", {
            "name": "bank", "protocol": "sftp", "host": server.host, "port": server.port,
            "username": "partner", "password": "partner-secret",
            "host_key": server.host_key_line,
        })  # fmt: skip
        job = post(cluster, f"{api(cluster, 'st3', 'scheduler')}/jobs", {
            "name": "pull-bank", "kind": "pull", "interval_seconds": 2, "coalesce": False,
            "misfire_grace_seconds": 60,
            "params": {"partner": "bank", "account": "acme", "folder": "inbox"},
        })  # fmt: skip
        engine = cluster_engine(cluster)
        inbox = cluster_data_dir(cluster) / "homes" / "acme" / "inbox"

        def runs_by(node: str) -> int:
            return sum(r.node_id == node for r in runs(engine, job["id"]))

        def drop(name: str) -> None:
            # As a partner uploads: under a hidden name, renamed when complete.
            (remote / f".{name}").write_text(f"content of {name}\n")
            os.replace(remote / f".{name}", remote / name)

        def drop_and_wait(names: list[str]) -> None:
            for name in names:
                if not (remote / name).exists():  # a rewrite would be a new version
                    drop(name)
            wait_until(lambda: all((inbox / n).is_file() for n in names), 30, f"{names} pulled")

        drop_and_wait(["a1.csv", "a2.csv"])
        wait_until(lambda: runs_by("st1") >= 3, 20, "3 runs on st1")

        cluster.run("server", "kill", "st1")
        drop("b1.csv")  # arrives during the failover
        wait_until(lambda: WORK_SCHEDULER in cluster.active("st2", "scheduler"), 30,
                   "st2 running the scheduler")  # fmt: skip
        drop_and_wait(["b1.csv", "b2.csv"])
        wait_until(lambda: runs_by("st2") >= 6, 30, "6 runs on st2")

        cluster.run("server", "start", "st1")  # fail-back once st1 is synchronized
        wait_until(lambda: WORK_SCHEDULER in cluster.active("st1", "scheduler"), 60,
                   "st1 running the scheduler again")  # fmt: skip
        wait_until(lambda: WORK_SCHEDULER not in cluster.active("st2", "scheduler"), 10)
        st1_before = runs_by("st1")
        drop_and_wait(["c1.csv"])
        wait_until(lambda: runs_by("st1") >= st1_before + 3, 30, "3 more runs on st1")
        paused = cluster.http.post(f"{api(cluster, 'st3', 'scheduler')}/jobs/{job['id']}/pause")
        assert paused.status_code == 200

        # Exactly once per fire time, none missing: an unbroken 2 s grid, st1 then st2 then
        # st1 again. The fire times that fell in the failover ran once, on st2.
        done = runs(engine, job["id"])
        assert_consecutive([r.fire_time for r in done], 2.0)
        nodes = [r.node_id for r in done]
        changes = [n for i, n in enumerate(nodes) if i == 0 or nodes[i - 1] != n]
        assert changes == ["st1", "st2", "st1"], nodes
        # The fire times that passed while no server was primary ran late, on st2.
        assert any(
            r.node_id == "st2" and r.claimed_at - r.fire_time > timedelta(seconds=2) for r in done
        )
        # Every run reached the event queue and was completed once by a transaction manager.
        wait_until(lambda: all(r.status == "done" for r in runs(engine, job["id"])), 30)

        def completed() -> set[str]:
            with Session(engine) as session:
                return set(session.exec(select(ProcessedEvent.event_id)).all())

        wait_until(lambda: {r.event_id for r in done} <= completed(), 30, "runs completed")

        # Each remote file was fetched once and announced once, whichever server pulled it.
        names = ["a1.csv", "a2.csv", "b1.csv", "b2.csv", "c1.csv"]
        with Session(engine) as session:
            pulled = session.exec(
                select(ScheduledFile).where(ScheduledFile.direction == "pull")
            ).all()
            legs = session.exec(select(Transfer.file_name).where(Transfer.leg == "pull")).all()
        assert sorted(f.name for f in pulled) == names
        assert all(f.status == "published" for f in pulled)
        assert sorted(legs) == [f"inbox/{n}" for n in names]
        wait_until(lambda: {f.arrived_event_id for f in pulled} <= completed(), 30)
        assert sorted(p.name for p in inbox.iterdir()) == names
        assert all((inbox / n).read_text() == f"content of {n}\n" for n in names)
        engine.dispose()
