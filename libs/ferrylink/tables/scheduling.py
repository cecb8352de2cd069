"""The scheduler's jobs, their runs, and the files scheduled pulls have fetched: primary-only
work whose state lives in the shared database, so that a promoted server continues where the
old primary stopped."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import BigInteger, Field, SQLModel, UniqueConstraint

from ferrylink.clock import utcnow


class ScheduledJob(SQLModel, table=True):
    """A scheduled transfer or maintenance application, run by the primary's scheduler."""

    __tablename__ = "scheduled_job"
    __table_args__ = {"sqlite_autoincrement": True}  # run history is keyed by job id

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    # pull | push | transfer_log_purge | transfer_log_archive | dead_letter_purge |
    # temp_file_cleanup | audit_log_purge | job_run_purge | scheduled_file_purge |
    # event_claim_purge | outbox_purge | sentinel_link_purge
    kind: str = Field(max_length=32)
    cron: str | None = Field(default=None, max_length=255)
    interval_seconds: float | None = Field(default=None)
    timezone: str = Field(default="UTC", max_length=64)
    # Interval triggers count from here (UTC), so every server computes the same fire times.
    start_at: datetime
    params_json: str = Field(default="{}")
    misfire_grace_seconds: float = Field(default=60.0)
    coalesce: bool = Field(default=True)
    enabled: bool = Field(default=True)
    # Grows on every change; the running scheduler reloads a job whose version changed.
    version: int = Field(default=1)
    created_at: datetime = Field(default_factory=utcnow)
    # Fire times before the last change (creation, resume, edit) never run.
    updated_at: datetime = Field(default_factory=utcnow)


class JobRun(SQLModel, table=True):
    """One fire time of a job, claimed once: the unique (job id, fire time) makes a run happen
    once even when two schedulers (a failover overlap, a redelivery) try it."""

    __tablename__ = "job_run"
    __table_args__ = (
        UniqueConstraint("job_id", "fire_time", name="uq_job_run_fire_time"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: int = Field(index=True)
    fire_time: datetime = Field(index=True)
    # claimed (event not yet confirmed by the broker) | submitted | done (completed by a
    # transaction manager) | missed (past its grace)
    status: str = Field(index=True, max_length=16)
    node_id: str = Field(max_length=64)
    event_id: str = Field(max_length=64)
    # The event exactly as first built, so a claimed run is published again unchanged.
    event_json: str = Field(default="")
    claimed_at: datetime = Field(default_factory=utcnow)
    submitted_at: datetime | None = Field(default=None)
    finished_at: datetime | None = Field(default=None)
    # Maintenance: how many records (or files) the run removed, and what, per table.
    removed: int | None = Field(default=None)
    result: str = Field(default="", max_length=1000)


_SCHEDULED_FILE_VERSION = ("job_id", "partner", "direction", "name", "size", "mtime")


class ScheduledFile(SQLModel, table=True):
    """A file a scheduled pull fetched or a scheduled push sent, per version (size, mtime):
    each version of a file is transferred once, even when the run's event comes again."""

    __tablename__ = "scheduled_file"
    __table_args__ = (
        UniqueConstraint(*_SCHEDULED_FILE_VERSION, name="uq_scheduled_file_version"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(index=True, max_length=64)
    partner: str = Field(max_length=64)
    direction: str = Field(max_length=8)  # pull | push
    name: str = Field(max_length=1024)
    size: int = Field(sa_type=BigInteger)
    mtime: float
    # pull: fetched -> published (file.arrived confirmed) -> removed (deleted remotely)
    # push: sent -> deleted (deleted locally)
    status: str = Field(max_length=16)
    event_id: str = Field(max_length=64)  # the scheduled run that did it
    arrived_event_id: str | None = Field(default=None, max_length=64)
    local_path: str = Field(default="", max_length=2048)  # relative to the data dir
    done_at: datetime = Field(default_factory=utcnow)
