"""The scheduler work unit: APScheduler runs the jobs of the `scheduled_job` table while this
server is assigned `scheduler.jobs`, and stops the moment it is not.

Exactly once per fire time, across failovers:
- A run is *claimed* by inserting (job id, fire time) into `job_run`, which has a unique
  constraint; whoever fails to insert (a second scheduler during an overlap) does nothing.
  The claim happens in APScheduler's own thread before it moves the job to its next fire
  time, so a crash never skips a fire time that was not claimed.
- The run's event (its id derived from job and fire time) is then published, confirmed, and
  the run marked `submitted`. A run left `claimed` (a crash, a broker outage) is published
  again later, by this server or the next primary; the transaction manager completes an
  event id once.
- Every write is fenced (ferrylink.fencing): a claim and a run's `submitted` mark commit
  only while the database's epoch is the one this scheduler's grant was issued under, and a
  run is published only while this process still holds that grant. A scheduler frozen past
  its grant (SIGSTOP, a VM pause) therefore claims nothing when it wakes up, even for a fire
  time nobody else claimed (a job paused meanwhile).
- A newly started scheduler (a promotion, a fail-back) resumes every job at the first fire
  time after its last recorded run: a fire time missed during the failover runs once, as long
  as it is within the job's grace time; an older one is recorded as `missed`.

The job table is the configuration every server shares; the running scheduler re-reads it
every `sync_interval` and reloads a job whose `version` changed.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.executors.base import BaseExecutor
from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import func, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from ferrylink.clock import as_utc
from ferrylink.contracts import EVENT, Event, JobRunStatus
from ferrylink.faults import fault_point
from ferrylink.fencing import Fence, Fenced, FencingToken, Unfenced
from ferrylink.tables.scheduling import JobRun, ScheduledJob
from services.scheduler.jobs import JobError, first_due, job_trigger, run_event

log = logging.getLogger(__name__)

CLAIMED, SUBMITTED, MISSED = JobRunStatus.CLAIMED, JobRunStatus.SUBMITTED, JobRunStatus.MISSED


class FireTimeExecutor(BaseExecutor):
    """Calls `job.func(*job.args, run_times=run_times)` in APScheduler's own thread.

    APScheduler's executors call a job function without its scheduled fire time, but a run
    is keyed by (job id, fire time). The function must be quick: it only claims the runs in
    the database and leaves the publishing to a thread pool.
    """

    def submit_job(self, job: Any, run_times: list[datetime]) -> None:
        job.func(*job.args, run_times=run_times, **job.kwargs)

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        raise NotImplementedError("submit_job does the work")


class JobScheduler:
    def __init__(
        self,
        engine: Engine,
        node_id: str,
        publish: Callable[[Event], object],
        sync_interval: float = 1.0,
        republish_after: float = 10.0,
        fence: Fence | None = None,
    ) -> None:
        self.engine = engine
        self.node_id = node_id
        self.fence = fence or Unfenced(node_id)
        # Publishes one event and returns once the broker confirmed it (raises if not).
        self.publish = publish
        self.sync_interval = sync_interval
        self.republish_after = republish_after
        self._lock = threading.Lock()
        self._running = False
        self._stop = threading.Event()
        self._sync_thread: threading.Thread | None = None
        self._scheduler: BackgroundScheduler | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._jobs: dict[int, ScheduledJob] = {}  # loaded into APScheduler, by id
        self._reload: set[int] = set()  # jobs to load again (a claim failed)
        self._in_flight: set[int] = set()  # run ids being published

    # -- work unit ------------------------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            if self._running:
                return
            self._running = True
            self._stop = threading.Event()
            self._jobs, self._reload, self._in_flight = {}, set(), set()
            self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="scheduler-publish")
            self._scheduler = BackgroundScheduler(
                timezone=UTC,
                executors={"default": FireTimeExecutor()},
                job_defaults={"misfire_grace_time": None, "max_instances": 1_000_000},
            )
            self._scheduler.start()
            self._sync_thread = threading.Thread(
                target=self._sync_forever, args=(self._stop,), name="scheduler-sync", daemon=True
            )
            self._sync_thread.start()
        log.info("scheduler started")

    def stop(self) -> None:
        with self._lock:
            if not self._running:
                return
            self._running = False
            self._stop.set()
            if self._sync_thread is not None:
                self._sync_thread.join()
            # Returns once APScheduler's thread is gone: no claim happens after this.
            if self._scheduler is not None:
                self._scheduler.shutdown(wait=True)
            # Publishing of claimed runs may finish; queued ones are published by whoever
            # runs the scheduler next (they stay `claimed`).
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
        log.info("scheduler stopped")

    @property
    def running(self) -> bool:
        return self._running

    def loaded(self) -> set[int]:
        """Ids of the jobs APScheduler currently has."""
        return set(self._jobs)

    # -- following the job table ----------------------------------------------------------------

    def _sync_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.sync()
            except Exception:
                log.exception("scheduler: could not read the job table")
            stop.wait(self.sync_interval)

    def sync(self) -> None:
        """Load new and changed jobs into APScheduler, drop deleted and paused ones, and
        publish again runs left claimed."""
        scheduler = self._scheduler
        if scheduler is None:
            return
        with Session(self.engine) as session:
            enabled = {
                job.id: job
                for job in session.exec(
                    select(ScheduledJob).where(col(ScheduledJob.enabled).is_(True))
                ).all()
                if job.id is not None
            }
            for job_id in set(self._jobs) - set(enabled):
                self._unload(scheduler, job_id)
            for job_id, job in enabled.items():
                loaded = self._jobs.get(job_id)
                if loaded is None or loaded.version != job.version or job_id in self._reload:
                    self._load(scheduler, session, job)
        self._republish_claimed()

    def _unload(self, scheduler: BackgroundScheduler, job_id: int) -> None:
        self._jobs.pop(job_id, None)
        if scheduler.get_job(str(job_id)) is not None:
            scheduler.remove_job(str(job_id))
        log.info("job %s unloaded", job_id)

    def _load(self, scheduler: BackgroundScheduler, session: Session, job: ScheduledJob) -> None:
        assert job.id is not None
        self._reload.discard(job.id)
        self._jobs[job.id] = job
        try:
            trigger = job_trigger(job)
        except JobError as exc:  # stored before a rule changed: skip it, loudly
            log.error("job %s (%s) cannot be scheduled: %s", job.id, job.name, exc)
            if scheduler.get_job(str(job.id)) is not None:
                scheduler.remove_job(str(job.id))
            return
        last_fire = session.exec(
            select(func.max(JobRun.fire_time)).where(JobRun.job_id == job.id)
        ).one()
        first = first_due(job, trigger, last_fire, datetime.now(UTC))
        if first is None:  # the trigger has no fire time left
            if scheduler.get_job(str(job.id)) is not None:
                scheduler.remove_job(str(job.id))
            return
        scheduler.add_job(
            self._claim, trigger=trigger, args=(job.id,), id=str(job.id), name=job.name,
            next_run_time=first, coalesce=job.coalesce, replace_existing=True,
        )  # fmt: skip
        log.info("job %s (%s) loaded, first fire time %s", job.id, job.name, first.isoformat())

    # -- runs -----------------------------------------------------------------------------------

    def _claim(self, job_id: int, run_times: Sequence[datetime] = ()) -> None:
        """APScheduler's thread: claim each fire time once; publish the claimed ones."""
        job = self._jobs.get(job_id)
        if job is None or job.id is None:
            return
        try:
            token = self.fence.token()
        except Fenced as exc:
            # Not primary any more: these fire times are the next primary's to claim.
            log.warning("job %s: fire times not claimed: %s", job.id, exc)
            return
        try:
            claimed = self._insert_runs(job, run_times, token)
        except Exception:
            # The fire times are not recorded: load the job again from its last recorded
            # run, so they are retried (within their grace) rather than skipped.
            self._reload.add(job.id)
            raise
        pool = self._pool
        for run_id, event, token in claimed:
            self._in_flight.add(run_id)
            if pool is not None:
                pool.submit(self._submit, run_id, event, token)

    def _insert_runs(
        self, job: ScheduledJob, run_times: Sequence[datetime], token: FencingToken
    ) -> list[tuple[int, Event, FencingToken]]:
        assert job.id is not None
        now = datetime.now(UTC)
        grace = timedelta(seconds=job.misfire_grace_seconds)
        claimed: list[tuple[int, Event, FencingToken]] = []
        with Session(self.engine) as session:
            for fire_time in run_times:
                late = now - as_utc(fire_time) > grace
                event = run_event(job, fire_time)
                run = JobRun(
                    job_id=job.id, fire_time=as_utc(fire_time),
                    status=MISSED if late else CLAIMED, node_id=self.node_id,
                    event_id=event.id, event_json="" if late else event.model_dump_json(),
                    claimed_at=as_utc(now),
                )  # fmt: skip
                # Tests freeze the process here: decided under its grant, not yet written.
                fault_point("scheduler-before-claim")
                session.add(run)
                try:
                    session.flush()
                    self.fence.check(session, token)
                    session.commit()
                except IntegrityError:  # claimed by another scheduler: theirs to run
                    session.rollback()
                    log.info("job %s at %s was claimed elsewhere", job.id, fire_time)
                    continue
                except Fenced:
                    # Not primary under this grant any more: this fire time and the rest
                    # are the next grant's to claim (this process's, should it be primary
                    # again: the job is loaded again from its last recorded run).
                    session.rollback()
                    self._reload.add(job.id)
                    break
                if late:
                    log.warning(
                        "job %s (%s) missed its fire time %s by more than its grace of %ss",
                        job.id, job.name, fire_time, job.misfire_grace_seconds,
                    )  # fmt: skip
                    continue
                assert run.id is not None
                claimed.append((run.id, event, token))
        return claimed

    def _submit(self, run_id: int, event: Event, token: FencingToken) -> None:
        try:
            self.fence.confirm(self.engine, token)
            self.publish(event)
        except Fenced as exc:
            log.warning("run %s: event %s not published: %s", run_id, event.id, exc)
            return
        except Exception as exc:
            log.warning(
                "run %s: event %s not confirmed (%s); will try again", run_id, event.id, exc
            )
            return
        finally:
            self._in_flight.discard(run_id)
        with Session(self.engine) as session:
            # One conditional statement: a transaction manager may have completed the run
            # (status done) already, and that must not be overwritten.
            session.exec(
                update(JobRun)
                .where(col(JobRun.id) == run_id, col(JobRun.status) == CLAIMED)
                .values(status=SUBMITTED, submitted_at=as_utc(datetime.now(UTC)))
            )
            try:
                self.fence.check(session, token)
            except Fenced:
                # Published all the same: the next primary publishes it again (the event
                # id is the same, so it is done once) and marks it.
                session.rollback()
                return
            session.commit()
        log.info("run %s submitted as event %s", run_id, event.id)

    def _republish_claimed(self) -> None:
        """Runs claimed but never confirmed (a crash, a broker outage) are published again,
        with the same event, so they are neither lost nor done twice."""
        before = as_utc(datetime.now(UTC) - timedelta(seconds=self.republish_after))
        try:
            token = self.fence.token()
        except Fenced:
            return
        with Session(self.engine) as session:
            stuck = session.exec(
                select(JobRun).where(JobRun.status == CLAIMED, JobRun.claimed_at < before)
            ).all()
        pool = self._pool
        for run in stuck:
            if run.id is None or run.id in self._in_flight or pool is None:
                continue
            log.info("run %s of job %s was never confirmed: publishing it again", run.id,
                     run.job_id)  # fmt: skip
            self._in_flight.add(run.id)
            pool.submit(self._submit, run.id, EVENT.validate_json(run.event_json), token)
