"""Scheduled transfers and maintenance applications: what the transaction manager does with
the `transfer.scheduled` and `maintenance.run` events the scheduler submits.

Idempotent, since an event may come again (a crash, a failover, a republished run):
- an event already completed (it has a `processed_event` row) is skipped;
- a pull fetches each version (name, size, mtime) of a remote file once, per job: the
  `scheduled_file` row is written after the fetch and before `file.arrived` is published,
  and the arrived event's id is derived from that version, so a repeat neither fetches again
  nor announces the file twice. A push sends each version of a local file once likewise;
- maintenance cutoffs count from the run's fire time, not from "now", so a repeat acts on
  the same records (and an archive chunk is rewritten under the same name).
Files are written to a temporary name and renamed (partners.pull_file does it for pulls).

A partner failure that may pass (PartnerError.retryable) never makes a worker sleep: the
files it hit are left for another pass of the run, which the event gets by being rescheduled
(RetryLater with a delay), after the rest of the pass is done. Up to ATTEMPTS passes; the
count is kept with the event (a `step_run` row, step 0), and the last pass records what still
fails as FAILED, as a failure that cannot pass is at once.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, assert_never

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from ferrylink.clock import as_utc, utcnow
from ferrylink.contracts import (
    AuditLogPurge,
    DeadLetterPurge,
    EventClaimPurge,
    FileArrived,
    JobRunPurge,
    MaintenanceRun,
    OutboxPurge,
    PullJob,
    PushJob,
    RejectMessage,
    RetryLater,
    ScheduledFilePurge,
    SentinelLinkPurge,
    TempFileCleanup,
    TransferLogArchive,
    TransferLogPurge,
    TransferScheduled,
)
from ferrylink.contracts import ScheduledFileStatus as FileStatus
from ferrylink.db import make_engine
from ferrylink.paths import PathError, confined, is_temporary, relative_to, sentinel_link_db
from ferrylink.tables.accounts import Account, Partner
from ferrylink.tables.admin import AuditRecord
from ferrylink.tables.events import DeadEvent, ProcessedEvent
from ferrylink.tables.scheduling import ScheduledFile
from ferrylink.tables.transfers import StepRun, Transfer
from services.transaction_manager import partners, purges
from services.transaction_manager.transfer_log import TransferLog, next_revision, settle

log = logging.getLogger(__name__)

Announce = Callable[[FileArrived], Future[None]]
PUBLISH_TIMEOUT = 30.0
# Namespace of the derived file.arrived ids of pulled files (any fixed UUID).
PULL_NAMESPACE = uuid.UUID("5b7d0c61-2f3a-4f1e-8c9d-7a6b5e4d3c21")
ATTEMPTS = 3  # passes of a scheduled transfer, for partner errors that may pass
BACKOFF_SECONDS = 1.0  # before pass n + 1: n times this
ARCHIVE_CHUNK = 5000


# --------------------------------------------------------------------------------------------
# Scheduled transfers
# --------------------------------------------------------------------------------------------


def run_scheduled_transfer(
    event: TransferScheduled,
    engine: Engine,
    data_dir: Path,
    node_id: str,
    publish: Announce,
    transfer_log: TransferLog | None = None,
) -> None:
    """Run a scheduled pull or push once. A partner failure is recorded in the transfer log
    (FAILED) and ends the run; what was not transferred is picked up by the next run. With a
    `transfer_log`, every leg state is also announced for the sentinel link. Raises
    RetryLater when a partner failure that may pass left files for another pass."""
    if _processed(engine, event.id):
        return
    run = _Run.load(event, engine, data_dir, node_id, transfer_log)
    if run is None:
        return
    match event.job:
        case PullJob():
            _pull(run, event.job, publish)
        case PushJob():
            _push(run, event.job)
    run.reschedule_if_wanted()


class _Run:
    """One scheduled transfer: its event, partner, account home and local folder."""

    def __init__(self, event: TransferScheduled, engine: Engine, data_dir: Path, node_id: str,
                 partner: Partner, account: Account, home: Path, folder: Path,
                 transfer_log: TransferLog | None) -> None:  # fmt: skip
        self.event, self.engine, self.data_dir, self.node_id = event, engine, data_dir, node_id
        self.transfer_log = transfer_log
        self.partner, self.account, self.home, self.folder = partner, account, home, folder
        self.job_id = str(event.job_id)
        self.passes_done = _passes_done(engine, event.id)
        self.retry_reason = ""  # set when a failure that may pass left work for another pass

    @classmethod
    def load(cls, event: TransferScheduled, engine: Engine, data_dir: Path, node_id: str,
             transfer_log: TransferLog | None) -> _Run | None:  # fmt: skip
        job = event.job
        with Session(engine) as session:
            partner = session.get(Partner, job.partner)
            account = session.get(Account, job.account)
        problem = None
        if partner is None:
            problem = f"unknown partner {job.partner!r}"
        elif account is None:
            problem = f"unknown account {job.account!r}"
        else:
            try:
                home = confined(data_dir, account.home)
                folder = confined(home, job.folder)
            except PathError as exc:
                problem = str(exc)
        if problem is not None or partner is None or account is None:
            _leg(engine, f"{event.id}:{job.kind}", "FAILED", event=event,
                 node_id=node_id, transfer_log=transfer_log, detail=problem or "")  # fmt: skip
            log.warning("scheduled transfer %s not run: %s", event.id, problem)
            return None
        folder.mkdir(parents=True, exist_ok=True)
        return cls(event, engine, data_dir, node_id, partner, account, home, folder, transfer_log)

    def gives_up(self, exc: partners.PartnerError) -> bool:
        """Whether `exc` is final for this run (then record it as FAILED); otherwise what it
        hit is left for the next pass."""
        if not exc.retryable or self.passes_done + 1 >= ATTEMPTS:
            return True
        log.info("scheduled transfer %s: %s; trying again in the next pass", self.event.id, exc)
        self.retry_reason = self.retry_reason or str(exc)
        return False

    def reschedule_if_wanted(self) -> None:
        """After a pass: if it left work for another, count the pass and reschedule the event
        (nothing sleeps here)."""
        if not self.retry_reason:
            return
        passes = self.passes_done + 1
        with Session(self.engine) as session:
            row = session.get(StepRun, (self.event.id, 0)) or StepRun(
                event_id=self.event.id, step_index=0
            )
            row.result = json.dumps({"passes": passes})
            row.finished_at = utcnow()
            session.add(row)
            session.commit()
        delay = BACKOFF_SECONDS * passes
        raise RetryLater(
            f"scheduled {self.event.job.kind} {self.event.id}: {self.retry_reason[:500]}; "
            f"pass {passes + 1} of {ATTEMPTS} in {delay:g} s",
            delay,
        )

    def leg(self, leg_key: str, status: str, **fields: Any) -> None:
        _leg(self.engine, leg_key, status, event=self.event, node_id=self.node_id,
             transfer_log=self.transfer_log, partner=self.partner.name,
             protocol=self.partner.protocol, account=self.account.name, **fields)  # fmt: skip

    def find(self, direction: str, name: str, size: int, mtime: float) -> ScheduledFile | None:
        with Session(self.engine) as session:
            return session.exec(
                select(ScheduledFile).where(
                    ScheduledFile.job_id == self.job_id, ScheduledFile.partner == self.partner.name,
                    ScheduledFile.direction == direction, ScheduledFile.name == name,
                    ScheduledFile.size == size, ScheduledFile.mtime == mtime,
                )
            ).first()  # fmt: skip

    def fetched_not_announced(self) -> list[ScheduledFile]:
        with Session(self.engine) as session:
            return list(
                session.exec(
                    select(ScheduledFile).where(
                        ScheduledFile.job_id == self.job_id,
                        ScheduledFile.partner == self.partner.name,
                        ScheduledFile.direction == "pull",
                        ScheduledFile.status == FileStatus.FETCHED,
                    )
                ).all()
            )  # fmt: skip

    def record(self, row: ScheduledFile) -> ScheduledFile:
        """Insert or update `row`; if another server inserted the same version meanwhile,
        theirs is returned."""
        with Session(self.engine) as session:
            session.add(row)
            try:
                session.commit()
            except IntegrityError:
                session.rollback()
                existing = self.find(row.direction, row.name, row.size, row.mtime)
                assert existing is not None
                return existing
            session.refresh(row)
            return row


def _pull(run: _Run, job: PullJob, publish: Announce) -> None:
    # Files fetched before a crash but never announced: announce them first, whether or not
    # the partner still lists them.
    for row in run.fetched_not_announced():
        _announce(run, row, publish)
    try:
        remote = partners.list_remote(run.partner, job.pattern)
    except partners.PartnerError as exc:
        if run.gives_up(exc):
            run.leg(f"{run.event.id}:list", "FAILED", leg="list", direction="inbound",
                    detail=str(exc))  # fmt: skip
            log.warning("scheduled pull %s: listing failed: %s", run.event.id, exc)
        return
    for remote_file in remote:
        try:
            _pull_one(run, remote_file, publish, job.delete_remote)
        except partners.PartnerError as exc:
            if run.gives_up(exc):
                log.warning("scheduled pull %s: %s", run.event.id, exc)


def _pull_one(run: _Run, remote: partners.RemoteFile, publish: Announce,
              delete_remote: bool) -> None:  # fmt: skip
    row = run.find("pull", remote.name, remote.size, remote.mtime)
    if row is None:
        key = f"{run.job_id}\0{run.partner.name}\0{remote.name}\0{remote.size}\0{remote.mtime!r}"
        arrived_id = uuid.uuid5(PULL_NAMESPACE, key).hex
        try:
            target = confined(run.folder, remote.name)
        except PathError as exc:
            raise partners.PartnerError(str(exc), retryable=False) from exc
        leg_key = f"{arrived_id}:pull"
        started = utcnow()
        try:
            size = partners.pull_file(run.partner, remote.name, target)
        except partners.PartnerError as exc:
            if run.gives_up(exc):
                run.leg(leg_key, "FAILED", leg="pull", direction="inbound", cycle_id=arrived_id,
                        file_name=relative_to(run.home, target), detail=str(exc))  # fmt: skip
                log.warning("scheduled pull %s: %s", run.event.id, exc)
            return
        row = run.record(
            ScheduledFile(
                job_id=run.job_id, partner=run.partner.name, direction="pull",
                name=remote.name, size=remote.size, mtime=remote.mtime, status=FileStatus.FETCHED,
                event_id=run.event.id, arrived_event_id=arrived_id,
                local_path=relative_to(run.data_dir, target),
            )
        )  # fmt: skip
        run.leg(leg_key, "RECEIVED", leg="pull", direction="inbound", cycle_id=arrived_id,
                bytes=size, file_name=relative_to(run.home, target),
                started_at=started)  # fmt: skip
    if row.status == FileStatus.FETCHED:
        row = _announce(run, row, publish)
    if row.status == FileStatus.PUBLISHED and delete_remote:
        partners.remove_remote(run.partner, remote.name)  # a PartnerError: see _pull
        row.status = FileStatus.REMOVED
        run.record(row)


def _announce(run: _Run, row: ScheduledFile, publish: Announce) -> ScheduledFile:
    """Publish the fetched file's `file.arrived` (its id fixed when it was fetched)."""
    assert row.arrived_event_id is not None
    local = run.data_dir / row.local_path
    publish(
        FileArrived(
            id=row.arrived_event_id, account=run.account.name,
            path=relative_to(run.home, local), size=row.size, cycle_id=row.arrived_event_id,
            protocol=run.partner.protocol,
        )
    ).result(PUBLISH_TIMEOUT)  # fmt: skip
    row.status = FileStatus.PUBLISHED
    return run.record(row)


def _push(run: _Run, job: PushJob) -> None:
    pattern, delete_local = job.pattern, job.delete_local
    for path in sorted(run.folder.iterdir()):
        if (
            is_temporary(path.name)
            or not fnmatch.fnmatchcase(path.name, pattern)
            or path.is_symlink()
            or not path.is_file()
        ):
            continue
        try:
            stat = path.stat()
        except FileNotFoundError:
            continue
        row = run.find("push", path.name, stat.st_size, stat.st_mtime)
        if row is None:
            leg_key = f"{run.event.id}:push:{hashlib.sha1(path.name.encode()).hexdigest()[:16]}"
            file_name = relative_to(run.home, path)
            started = utcnow()
            try:
                sent = partners.push_file(run.partner, path, path.name)
            except (partners.PartnerError, OSError) as exc:
                if isinstance(exc, OSError) or run.gives_up(exc):
                    run.leg(leg_key, "FAILED", leg="push", direction="outbound",
                            file_name=file_name, detail=str(exc))  # fmt: skip
                    log.warning("scheduled push %s: %s", run.event.id, exc)
                continue
            row = run.record(
                ScheduledFile(
                    job_id=run.job_id, partner=run.partner.name, direction="push",
                    name=path.name, size=stat.st_size, mtime=stat.st_mtime, status=FileStatus.SENT,
                    event_id=run.event.id, local_path=relative_to(run.data_dir, path),
                )
            )  # fmt: skip
            run.leg(leg_key, "SENT", leg="push", direction="outbound", file_name=file_name,
                    bytes=sent, started_at=started)  # fmt: skip
        if row.status == FileStatus.SENT and delete_local:
            path.unlink(missing_ok=True)
            row.status = FileStatus.DELETED
            run.record(row)


def _passes_done(engine: Engine, event_id: str) -> int:
    """How many passes of a scheduled transfer were rescheduled before this one."""
    with Session(engine) as session:
        row = session.get(StepRun, (event_id, 0))
    return int(json.loads(row.result).get("passes", 0)) if row is not None and row.result else 0


def _leg(engine: Engine, leg_key: str, status: str, event: TransferScheduled, node_id: str,
         transfer_log: TransferLog | None = None, **fields: Any) -> None:  # fmt: skip
    """Record a transfer-log leg once (leg_key is unique); a repeat updates its status. With
    a transfer log, the committed state is announced (confirmed) for the sentinel link."""
    fields.setdefault("cycle_id", event.id)
    fields.setdefault("account", event.job.account)
    fields.setdefault("file_name", event.job.folder)
    fields.setdefault("protocol", "unknown")
    fields.setdefault("leg", event.job.kind)
    fields.setdefault("direction", "inbound")
    fields["detail"] = str(fields.get("detail", ""))[:2000]
    now = utcnow()
    with Session(engine, expire_on_commit=False) as session:
        row = session.exec(select(Transfer).where(Transfer.leg_key == leg_key)).first()
        if row is None:
            row = Transfer(leg_key=leg_key, event_id=event.id, status=status, node_id=node_id,
                           revision=next_revision(None), **fields)  # fmt: skip
        else:
            if row.status != status:  # the same state again is a repeat (the same id)
                row.revision = next_revision(row.revision)
            row.status, row.node_id, row.detail = status, node_id, fields["detail"]
        row.finished_at = now
        started = as_utc(row.started_at)
        row.duration_ms = max(0, int((now - started).total_seconds() * 1000))
        session.add(row)
        try:
            # The state message joins the leg's transaction (the outbox).
            staged = transfer_log.announce(session, row) if transfer_log is not None else None
            session.commit()
        except IntegrityError:  # recorded by another server meanwhile
            session.rollback()
            return
    if transfer_log is not None and staged is not None:
        settle([transfer_log.publish(staged)])


# --------------------------------------------------------------------------------------------
# Maintenance applications
# --------------------------------------------------------------------------------------------


def run_maintenance(
    event: MaintenanceRun,
    engine: Engine,
    data_dir: Path,
    node_id: str,
    state_dir: Path | None = None,
) -> purges.Removed:
    """Run a maintenance application once (the transaction manager records completion, and
    what was removed, in the job run). Cutoffs count from the fire time, so a repeat acts on
    the same records. `state_dir`: this server's own files (passive_legacy link data)."""
    if _processed(engine, event.id):
        return purges.Removed()
    fired = as_utc(event.fire_time)
    task = event.task
    try:
        match task:
            case TransferLogPurge():
                removed = purge_transfers(engine, fired - timedelta(days=task.days))
            case TransferLogArchive():
                folder = confined(data_dir, task.folder)
                removed = purges.Removed()
                removed.add("transfer", archive_transfers(
                    engine, folder, fired - timedelta(days=task.days), event.id))  # fmt: skip
            case DeadLetterPurge():
                removed = purge_dead_events(engine, fired - timedelta(days=task.days))
            case AuditLogPurge():
                removed = purge_audit_records(engine, fired - timedelta(days=task.days))
            case TempFileCleanup():
                folder = confined(data_dir, task.folder)
                cutoff = fired - timedelta(hours=task.max_age_hours)
                removed = purges.Removed()
                removed.add("files", remove_temp_files(folder, task.patterns, cutoff))
            case JobRunPurge():
                removed = purges.purge_job_runs(engine, fired - timedelta(days=task.days))
            case ScheduledFilePurge():
                removed = purges.purge_scheduled_files(engine, fired - timedelta(days=task.days))
            case EventClaimPurge():
                removed = purges.purge_event_records(engine, fired - timedelta(days=task.days))
            case OutboxPurge():
                removed = purges.park_stuck_outbox(engine, fired - timedelta(days=task.days))
            case SentinelLinkPurge():
                links = [engine]
                local = sentinel_link_db(state_dir, node_id) if state_dir is not None else None
                if local is not None and local.is_file():
                    links.append(make_engine(f"sqlite:///{local}"))
                try:
                    removed = purges.purge_sentinel_link(
                        engine, links, fired - timedelta(days=task.days)
                    )
                finally:
                    for link in links[1:]:
                        link.dispose()
            case _:
                assert_never(task)
    except PathError as exc:
        raise RejectMessage(f"bad maintenance parameters: {exc}") from exc
    log.info("maintenance %s (%s) on %s: %d record(s)/file(s) removed (%s)", task.kind,
             event.id, node_id, removed.total, removed.summary())  # fmt: skip
    return removed


def purge_audit_records(engine: Engine, cutoff: datetime) -> purges.Removed:
    """Delete audit records written before `cutoff`, in batches."""
    return purges.Removed.of(
        "audit_record", purges.delete_batched(engine, AuditRecord.id, col(AuditRecord.at) < cutoff)
    )


def purge_transfers(engine: Engine, cutoff: datetime) -> purges.Removed:
    """Delete transfer-log records started before `cutoff`, in batches."""
    return purges.Removed.of(
        "transfer", purges.delete_batched(engine, Transfer.id, col(Transfer.started_at) < cutoff)
    )


def archive_transfers(engine: Engine, folder: Path, cutoff: datetime, run_id: str) -> int:
    """Move transfer-log records started before `cutoff` into JSON-lines files in `folder`,
    chunk by chunk: each chunk's file (named by run and first record id, so a repeat
    rewrites the same file) is complete on disk before its records are deleted."""
    folder.mkdir(parents=True, exist_ok=True)
    archived = 0
    while True:
        with Session(engine) as session:
            rows = session.exec(
                select(Transfer)
                .where(col(Transfer.started_at) < cutoff)
                .order_by(col(Transfer.id))
                .limit(ARCHIVE_CHUNK)
            ).all()
            if not rows:
                return archived
            target = folder / f"transfer-log-{run_id}-{rows[0].id}.jsonl"
            temporary = target.with_name(f".{target.name}.part")
            with temporary.open("w") as stream:
                for row in rows:
                    stream.write(json.dumps(row.model_dump(mode="json")) + "\n")
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)
            ids = [row.id for row in rows]
            session.exec(delete(Transfer).where(col(Transfer.id).in_(ids)))
            session.commit()
            archived += len(rows)


def purge_dead_events(engine: Engine, cutoff: datetime) -> purges.Removed:
    """Delete dead-letter entries parked before `cutoff`, in batches."""
    return purges.Removed.of(
        "dead_event", purges.delete_batched(engine, DeadEvent.id, col(DeadEvent.dead_at) < cutoff)
    )


def remove_temp_files(folder: Path, patterns: list[str], cutoff: datetime) -> int:
    """Delete files under `folder` whose names match `patterns` and that were last modified
    before `cutoff` (a stale upload, not one in progress). Symlinks are not followed."""
    removed = 0
    limit = cutoff.timestamp()
    for directory, _dirs, names in os.walk(folder, followlinks=False):
        for name in names:
            if not any(fnmatch.fnmatchcase(name, p) for p in patterns):
                continue
            path = Path(directory) / name
            try:
                if path.is_symlink() or path.stat().st_mtime >= limit:
                    continue
                path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
    return removed


# --------------------------------------------------------------------------------------------


def _processed(engine: Engine, event_id: str) -> bool:
    with Session(engine) as session:
        return session.get(ProcessedEvent, event_id) is not None
