"""The default maintenance jobs: one per table that grows, created once per cluster.

Every scheduler tries at start; the first creates the jobs that were never created before
(one transaction, with a configuration version bump; a second scheduler at the same moment
fails on the unique job names and finds them created). Which defaults were created is kept
in the `cluster_setting` row `scheduler.default_jobs`, so a default job an administrator
deleted is not created again, and a default added by a later version is created once.
Switched off with `FERRYLINK_SCHEDULER_DEFAULT_JOBS=false`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from ferrylink.config import bump_config_version
from ferrylink.contracts import (
    AuditLogPurge,
    DeadLetterPurge,
    EventClaimPurge,
    JobParams,
    JobRunPurge,
    OutboxPurge,
    ScheduledFilePurge,
    SentinelLinkPurge,
    TransferLogPurge,
)
from ferrylink.tables.cluster import ClusterSetting
from ferrylink.tables.scheduling import ScheduledJob

log = logging.getLogger(__name__)

SEEDED_KEY = "scheduler.default_jobs"


@dataclass(frozen=True)
class DefaultJob:
    name: str
    params: JobParams
    cron: str  # daily, a few minutes apart, at night (UTC)


DEFAULT_JOBS: tuple[DefaultJob, ...] = (
    DefaultJob("purge-transfer-log", TransferLogPurge(), "10 3 * * *"),
    DefaultJob("purge-audit-log", AuditLogPurge(), "15 3 * * *"),
    DefaultJob("purge-dead-letters", DeadLetterPurge(), "20 3 * * *"),
    DefaultJob("purge-job-runs", JobRunPurge(), "25 3 * * *"),
    DefaultJob("purge-scheduled-files", ScheduledFilePurge(), "30 3 * * *"),
    DefaultJob("purge-event-records", EventClaimPurge(), "35 3 * * *"),
    DefaultJob("park-stuck-outbox", OutboxPurge(), "40 3 * * *"),
    DefaultJob("purge-sentinel-link", SentinelLinkPurge(), "45 3 * * *"),
)


def seeded(session: Session) -> set[str]:
    row = session.get(ClusterSetting, SEEDED_KEY)
    return {name for name in (row.value.split(",") if row else []) if name}


def seed_default_jobs(
    engine: Engine, misfire_grace: float, defaults: tuple[DefaultJob, ...] = DEFAULT_JOBS
) -> list[str]:
    """Create the default jobs never created before; the names created (empty when there was
    nothing to do, or another scheduler did it). The caller announces the change."""
    with Session(engine) as session:
        done = seeded(session)
        missing = [job for job in defaults if job.name not in done]
        if not missing:
            return []
        try:
            created = _create(session, missing, misfire_grace)
            row = session.get(ClusterSetting, SEEDED_KEY) or ClusterSetting(key=SEEDED_KEY,
                                                                            value="")  # fmt: skip
            row.value = ",".join(sorted(done | {job.name for job in missing}))
            session.add(row)
            if created:
                bump_config_version(session)
            session.commit()
        except IntegrityError:  # another scheduler created them at the same moment
            session.rollback()
            return []
    if created:
        log.info("created the default maintenance jobs %s", ", ".join(created))
    return created


def _create(session: Session, missing: list[DefaultJob], misfire_grace: float) -> list[str]:
    now = datetime.now(UTC).replace(microsecond=0)
    created = []
    for job in missing:
        exists = session.exec(select(ScheduledJob).where(ScheduledJob.name == job.name))
        if exists.first() is not None:  # made by hand under that name: left alone
            continue
        session.add(
            ScheduledJob(
                name=job.name, kind=job.params.kind, cron=job.cron, timezone="UTC",
                start_at=now, params_json=job.params.model_dump_json(exclude={"kind"}),
                misfire_grace_seconds=misfire_grace, created_at=now, updated_at=now,
            )
        )  # fmt: skip
        created.append(job.name)
    return created
