"""Jobs: list, create, pause, resume and delete scheduled jobs, with each job's last and
next run and its run history.

Any server answers (the jobs live in the shared database); only the primary runs them.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from ferrylink.audit import AuditDep
from ferrylink.deps import CommitConfigChange, ConfigChangeDep, SessionDep
from ferrylink.paging import Page, PagingDep, page_of
from ferrylink.tables.scheduling import JobRun, ScheduledJob
from services.scheduler.api.deps import StoreDep
from services.scheduler.jobs import (
    JobError,
    as_utc,
    check_params,
    job_trigger,
    make_trigger,
    upcoming,
)

router = APIRouter(prefix="/jobs", tags=["jobs"])

JobKind = Literal[
    "pull", "push", "transfer_log_purge", "transfer_log_archive", "dead_letter_purge",
    "temp_file_cleanup", "audit_log_purge", "job_run_purge", "scheduled_file_purge",
    "event_claim_purge", "outbox_purge", "sentinel_link_purge",
]  # fmt: skip


class JobIn(BaseModel):
    name: str = Field(min_length=1, max_length=128)
    kind: JobKind = Field(
        description="pull/push: a scheduled transfer with a partner (params: partner, "
        "account, folder, pattern, delete_remote/delete_local). Maintenance: "
        "transfer_log_purge/transfer_log_archive (days, archive folder), dead_letter_purge "
        "(days), temp_file_cleanup (folder, max_age_hours, patterns), audit_log_purge (days); "
        "the bookkeeping purges job_run_purge, scheduled_file_purge, event_claim_purge, "
        "outbox_purge, sentinel_link_purge (days: 1 to 3650)."
    )
    cron: str | None = Field(
        None,
        max_length=255,
        description="Crontab expression, 5 fields, or 6 with seconds first; weekdays count "
        "from Sunday = 0 as in crontab.",
    )
    interval_seconds: int | None = Field(None, ge=1, le=366 * 86400)
    timezone: str = Field("UTC", max_length=64, description="IANA time zone of the trigger.")
    start_at: datetime | None = Field(
        None, description="Interval triggers count from here (default: now)."
    )
    params: dict[str, str | int | float | bool] = Field(default_factory=dict)
    misfire_grace_seconds: float | None = Field(
        None, ge=0, description="A fire time missed by less than this still runs (once)."
    )
    coalesce: bool = Field(
        True, description="Several missed fire times run once (the latest), not each."
    )
    enabled: bool = True


class JobPatch(BaseModel):
    """What an update may change (not the kind); absent fields stay as they are. Giving a
    cron replaces an interval and the other way round. Fire times before the change never
    run, as after a resume."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, min_length=1, max_length=128)
    cron: str | None = Field(None, max_length=255)
    interval_seconds: int | None = Field(None, ge=1, le=366 * 86400)
    timezone: str | None = Field(None, max_length=64)
    start_at: datetime | None = None
    params: dict[str, str | int | float | bool] | None = Field(
        None, description="The whole new parameter set."
    )
    misfire_grace_seconds: float | None = Field(None, ge=0)
    coalesce: bool | None = None
    enabled: bool | None = None


class RunOut(BaseModel):
    fire_time: datetime
    status: str = Field(
        description="claimed, submitted (event on the queue), done (the transaction manager "
        "completed it) or missed"
    )
    node_id: str
    event_id: str
    claimed_at: datetime
    submitted_at: datetime | None
    finished_at: datetime | None = Field(description="When the transaction manager completed it")
    removed: int | None = Field(description="Maintenance: how many records or files it removed")
    result: str = Field(description="Maintenance: what it removed, per table")


class JobOut(BaseModel):
    id: int
    name: str
    kind: str
    cron: str | None
    interval_seconds: int | None
    timezone: str
    start_at: datetime
    params: dict[str, Any]
    misfire_grace_seconds: float
    coalesce: bool
    enabled: bool
    created_at: datetime
    updated_at: datetime
    last_run: RunOut | None
    next_run: datetime | None


def _run_out(run: JobRun) -> RunOut:
    return RunOut(
        fire_time=as_utc(run.fire_time), status=run.status, node_id=run.node_id,
        event_id=run.event_id, claimed_at=as_utc(run.claimed_at),
        submitted_at=as_utc(run.submitted_at) if run.submitted_at else None,
        finished_at=as_utc(run.finished_at) if run.finished_at else None,
        removed=run.removed, result=run.result,
    )  # fmt: skip


def _job_out(session: Session, job: ScheduledJob) -> JobOut:
    assert job.id is not None
    last = session.exec(
        select(JobRun).where(JobRun.job_id == job.id).order_by(col(JobRun.fire_time).desc())
    ).first()
    try:
        next_run = upcoming(
            job, job_trigger(job), last.fire_time if last else None, datetime.now(UTC)
        )
    except JobError:
        next_run = None
    return JobOut(
        id=job.id, name=job.name, kind=job.kind, cron=job.cron,
        interval_seconds=int(job.interval_seconds) if job.interval_seconds else None,
        timezone=job.timezone, start_at=as_utc(job.start_at),
        params=json.loads(job.params_json), misfire_grace_seconds=job.misfire_grace_seconds,
        coalesce=job.coalesce, enabled=job.enabled, created_at=as_utc(job.created_at),
        updated_at=as_utc(job.updated_at), last_run=_run_out(last) if last else None,
        next_run=next_run,
    )  # fmt: skip


def _get(session: Session, job_id: int) -> ScheduledJob:
    job = session.get(ScheduledJob, job_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id}")
    return job


@router.get("", summary="Every job, with its last and next run")
def list_jobs(session: SessionDep, paging: PagingDep) -> Page[JobOut]:
    query = select(ScheduledJob).order_by(col(ScheduledJob.id))
    return page_of(session, query, paging, lambda job: _job_out(session, job))


@router.post("", status_code=201, summary="Create a job (422 with the reason if refused)")
def create_job(
    body: JobIn,
    store: StoreDep,
    session: SessionDep,
    audit: AuditDep,
    response: Response,
    commit: ConfigChangeDep,
) -> JobOut:
    now = datetime.now(UTC).replace(microsecond=0)
    # Whole seconds, so interval fire times (and the run keys) are whole seconds too.
    start_at = as_utc(body.start_at or now).replace(microsecond=0)
    try:
        make_trigger(body.cron, body.interval_seconds, body.timezone, start_at)
        params = check_params(body.kind, dict(body.params), session, store.data_dir)
    except JobError as exc:
        raise HTTPException(422, str(exc)) from exc
    job = ScheduledJob(
        name=body.name, kind=body.kind, cron=body.cron.strip() if body.cron else None,
        interval_seconds=body.interval_seconds, timezone=body.timezone,
        start_at=as_utc(start_at), params_json=json.dumps(params),
        misfire_grace_seconds=(
            store.default_grace if body.misfire_grace_seconds is None
            else body.misfire_grace_seconds
        ),
        coalesce=body.coalesce, enabled=body.enabled,
        created_at=as_utc(now), updated_at=as_utc(now),
    )  # fmt: skip
    session.add(job)
    try:
        session.flush()
    except IntegrityError as exc:
        raise HTTPException(409, f"a job named {body.name!r} exists already") from exc
    audit.record(session, "job.create", job.name, after=job)
    commit(session)
    session.refresh(job)
    response.headers["Location"] = f"/jobs/{job.id}"
    return _job_out(session, job)


@router.patch("/{job_id}", summary="Change a job (422 with the reason if refused)")
def update_job(
    job_id: int,
    body: JobPatch,
    store: StoreDep,
    session: SessionDep,
    audit: AuditDep,
    commit: ConfigChangeDep,
) -> JobOut:
    job = _get(session, job_id)
    before = job.model_dump(mode="json")
    change = body.model_dump(exclude_unset=True)
    nullable = {"cron", "interval_seconds"}
    if any(value is None for key, value in change.items() if key not in nullable):
        raise HTTPException(422, "a field given may not be null; leave it out to keep it")
    cron, interval = job.cron, int(job.interval_seconds) if job.interval_seconds else None
    if "cron" in change or "interval_seconds" in change:
        cron, interval = change.get("cron"), change.get("interval_seconds")
    start_at = as_utc(change.get("start_at", job.start_at)).replace(microsecond=0)
    timezone = change.get("timezone", job.timezone)
    try:
        make_trigger(cron, interval, timezone, start_at)
        if "params" in change:
            job.params_json = json.dumps(
                check_params(job.kind, dict(change["params"]), session, store.data_dir)
            )
    except JobError as exc:
        raise HTTPException(422, str(exc)) from exc
    job.cron, job.interval_seconds = (cron.strip() if cron else None), interval
    job.timezone, job.start_at = timezone, start_at
    for key in ("name", "misfire_grace_seconds", "coalesce", "enabled"):
        if key in change:
            setattr(job, key, change[key])
    job.version += 1
    # Like a resume: fire times before the change do not run under the new definition.
    job.updated_at = as_utc(datetime.now(UTC).replace(microsecond=0))
    session.add(job)
    try:
        session.flush()
    except IntegrityError as exc:
        raise HTTPException(409, f"a job named {job.name!r} exists already") from exc
    audit.record(session, "job.update", job.name, before, job)
    commit(session)
    session.refresh(job)
    return _job_out(session, job)


@router.get("/{job_id}", summary="One job, with its last and next run")
def get_job(job_id: int, session: SessionDep) -> JobOut:
    return _job_out(session, _get(session, job_id))


@router.get("/{job_id}/runs", summary="The job's runs, newest first")
def list_runs(job_id: int, session: SessionDep, paging: PagingDep) -> Page[RunOut]:
    _get(session, job_id)
    query = (
        select(JobRun)
        .where(JobRun.job_id == job_id)
        .order_by(col(JobRun.fire_time).desc(), col(JobRun.id).desc())
    )
    return page_of(session, query, paging, _run_out)


def _set_enabled(
    session: Session, audit: AuditDep, commit: CommitConfigChange, job_id: int, enabled: bool
) -> JobOut:
    job = _get(session, job_id)
    if job.enabled != enabled:
        audit.record(session, "job.resume" if enabled else "job.pause", job.name,
                     before=job.model_dump(mode="json"), after={"enabled": enabled})  # fmt: skip
        job.enabled = enabled
        job.version += 1
        # Resumed: fire times that passed while paused do not run.
        job.updated_at = as_utc(datetime.now(UTC).replace(microsecond=0))
        session.add(job)
        commit(session)
        session.refresh(job)
    return _job_out(session, job)


@router.post("/{job_id}/pause", summary="Stop running the job (its history is kept)")
def pause_job(job_id: int, session: SessionDep, audit: AuditDep, commit: ConfigChangeDep) -> JobOut:
    return _set_enabled(session, audit, commit, job_id, False)


@router.post(
    "/{job_id}/resume",
    summary="Run the job again from its next fire time (missed ones while paused do not run)",
)
def resume_job(
    job_id: int, session: SessionDep, audit: AuditDep, commit: ConfigChangeDep
) -> JobOut:
    return _set_enabled(session, audit, commit, job_id, True)


@router.delete("/{job_id}", status_code=204, summary="Delete the job and its run history")
def delete_job(
    job_id: int, session: SessionDep, audit: AuditDep, commit: ConfigChangeDep
) -> Response:
    job = _get(session, job_id)
    audit.record(session, "job.delete", job.name, before=job)
    session.delete(job)
    session.exec(delete(JobRun).where(col(JobRun.job_id) == job_id))
    commit(session)
    return Response(status_code=204)
