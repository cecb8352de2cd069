"""What a scheduled job is: its trigger (cron or interval, in a time zone), its kind and
parameters, and the event each fire time submits to the event queue.

Kept free of the running scheduler so that the API (on any server) and the scheduler (on the
primary) agree on every fire time: cron fire times fall on whole seconds, and interval
triggers count from the job's stored `start_at`, never from "when this server started".
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from pydantic import ValidationError
from sqlmodel import Session

from ferrylink.clock import as_utc
from ferrylink.contracts import (
    JOB_KINDS,
    JOB_PARAMS,
    TRANSFER_JOB_KINDS,
    JobParams,
    MaintenanceRun,
    PullJob,
    PushJob,
    TransferScheduled,
)
from ferrylink.paths import PathError, confined, in_data_dir, relative_to
from ferrylink.tables.accounts import Account, Partner
from ferrylink.tables.scheduling import ScheduledJob

# The kinds and their parameters are contracts (ferrylink.contracts): pull, push,
# transfer_log_purge (older than `days`), transfer_log_archive (to JSON lines under
# `folder`), dead_letter_purge, temp_file_cleanup (older than `max_age_hours`),
# audit_log_purge, and the purges of the bookkeeping tables (job_run_purge,
# scheduled_file_purge, event_claim_purge, outbox_purge, sentinel_link_purge; one default
# job each: defaults.py).
TRANSFER_KINDS = TRANSFER_JOB_KINDS
KINDS = JOB_KINDS

# A moment just after a fire time, to ask a trigger for the *next* one (fire times fall on
# whole seconds, so this never skips one).
JUST_AFTER = timedelta(milliseconds=1)


class JobError(ValueError):
    """A job definition that cannot work; the message says why (the API answers 422)."""


# --------------------------------------------------------------------------------------------
# Triggers
# --------------------------------------------------------------------------------------------


def time_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise JobError(
            f"unknown time zone {name!r} (use an IANA name such as 'Europe/Paris')"
        ) from None


_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_NUMERIC_WEEKDAYS = re.compile(r"(\*|[0-7])(?:-([0-7]))?(?:/([1-9][0-9]*))?")


def standard_weekdays(field: str) -> str:
    """Crontab counts weekdays 0-7 from Sunday; APScheduler 3 counts 0 from Monday (its
    documented historical mistake). Numbers are turned into names, so an expression means
    what it means in crontab."""
    if field == "*":
        return field
    days: list[str] = []
    for part in field.split(","):
        match = _NUMERIC_WEEKDAYS.fullmatch(part)
        if match is None:
            days.append(part)  # names ("mon-fri"), or an error APScheduler reports
            continue
        start, end, step = match.groups()
        if start == "*":
            if end is not None:
                raise JobError(f"weekday {part!r} is not valid")
            first, last = 0, 6
        else:
            first = int(start)
            last = int(end) if end is not None else (7 if step else first)
        if first > last:
            raise JobError(f"weekday range {part!r} runs backwards")
        days.extend(_WEEKDAYS[day % 7] for day in range(first, last + 1, int(step or 1)))
    return ",".join(dict.fromkeys(days))


def cron_trigger(expression: str, zone: ZoneInfo) -> CronTrigger:
    """A crontab expression: 5 fields (minute hour day month weekday), or 6 with seconds
    first (for jobs due more often than once a minute)."""
    fields = expression.split()
    if len(fields) == 5:
        fields = ["0", *fields]
    if len(fields) != 6:
        raise JobError(
            f"cron expression {expression!r} has {len(fields)} fields; expected 5 "
            "(minute hour day month weekday) or 6 (second minute hour day month weekday)"
        )
    second, minute, hour, day, month, weekday = fields
    try:
        return CronTrigger(
            second=second, minute=minute, hour=hour, day=day, month=month,
            day_of_week=standard_weekdays(weekday), timezone=zone,
        )  # fmt: skip
    except ValueError as exc:
        raise JobError(f"bad cron expression {expression!r}: {exc}") from exc


def make_trigger(
    cron: str | None, interval_seconds: int | None, timezone: str, start_at: datetime
) -> BaseTrigger:
    zone = time_zone(timezone)
    if (cron is None) == (interval_seconds is None):
        raise JobError("give either a cron expression or interval_seconds (exactly one)")
    if cron is not None:
        return cron_trigger(cron, zone)
    assert interval_seconds is not None
    if interval_seconds < 1:
        raise JobError("interval_seconds must be at least 1")
    return IntervalTrigger(seconds=interval_seconds, start_date=as_utc(start_at), timezone=zone)


def job_trigger(job: ScheduledJob) -> BaseTrigger:
    interval = int(job.interval_seconds) if job.interval_seconds is not None else None
    return make_trigger(job.cron, interval, job.timezone, job.start_at)


def next_fire_time(trigger: BaseTrigger, after: datetime) -> datetime | None:
    """The first fire time at or after `after` (aware UTC), or None if there is none."""
    fire: datetime | None = trigger.get_next_fire_time(None, as_utc(after))
    return as_utc(fire) if fire is not None else None


def first_due(
    job: ScheduledJob, trigger: BaseTrigger, last_fire: datetime | None, now: datetime
) -> datetime | None:
    """Where a (re)started scheduler resumes a job: the first fire time after its last
    recorded run, after its last change, and no older than its grace (older ones would be
    missed anyway). A fire time missed during a failover is thus still run once."""
    since = max(as_utc(job.updated_at), as_utc(now) - timedelta(seconds=job.misfire_grace_seconds))
    if last_fire is not None:
        since = max(since, as_utc(last_fire) + JUST_AFTER)
    return next_fire_time(trigger, since)


def upcoming(
    job: ScheduledJob, trigger: BaseTrigger, last_fire: datetime | None, now: datetime
) -> datetime | None:
    """The next fire time in the future, for the API's `next_run`."""
    if not job.enabled:
        return None
    since = max(as_utc(job.updated_at), as_utc(now))
    if last_fire is not None:
        since = max(since, as_utc(last_fire) + JUST_AFTER)
    return next_fire_time(trigger, since)


# --------------------------------------------------------------------------------------------
# The event of a fire time
# --------------------------------------------------------------------------------------------


def run_event_id(job_id: int, fire_time: datetime) -> str:
    """The id of a run's event: the same (job, fire time) always gives the same id, so a run
    published twice (a crash before its confirm was recorded) is completed once."""
    return f"job{job_id}-{as_utc(fire_time):%Y%m%dT%H%M%S}Z"


def job_params(job: ScheduledJob) -> JobParams:
    """The job's stored parameters as their typed contract."""
    return JOB_PARAMS.validate_python({**json.loads(job.params_json), "kind": job.kind})


def run_event(job: ScheduledJob, fire_time: datetime) -> TransferScheduled | MaintenanceRun:
    assert job.id is not None
    event_id = run_event_id(job.id, fire_time)
    params = job_params(job)
    common = dict(id=event_id, cycle_id=event_id, job_id=job.id, job_name=job.name,
                  fire_time=as_utc(fire_time))  # fmt: skip
    if isinstance(params, PullJob | PushJob):
        return TransferScheduled(job=params, **common)
    return MaintenanceRun(task=params, **common)


# --------------------------------------------------------------------------------------------
# Parameters per kind
# --------------------------------------------------------------------------------------------


def check_params(
    kind: str, given: dict[str, Any], session: Session, data_dir: Path
) -> dict[str, Any]:
    """The job's parameters with defaults filled in, normalized; JobError names the problem.

    Folders are stored relative: to the account's home for transfers, to the data directory
    for maintenance.
    """
    if kind not in KINDS:
        raise JobError(f"unknown job kind {kind!r}; known: {', '.join(KINDS)}")
    try:
        params = JOB_PARAMS.validate_python({**given, "kind": kind})
    except ValidationError as exc:
        raise JobError("; ".join(_problem(kind, e) for e in exc.errors())) from None
    try:
        if isinstance(params, PullJob | PushJob):
            if session.get(Partner, params.partner) is None:
                raise JobError(f"unknown partner {params.partner!r}")
            account = session.get(Account, params.account)
            if account is None:
                raise JobError(f"unknown account {params.account!r}")
            home = confined(data_dir.resolve(), account.home)
            params.folder = _relative(home, confined(home, params.folder))
        elif hasattr(params, "folder"):
            params.folder = _relative(data_dir, in_data_dir(data_dir, params.folder))
    except PathError as exc:
        raise JobError(str(exc)) from exc
    return params.model_dump(mode="json", exclude={"kind"})


def _problem(kind: str, error: Any) -> str:
    """One validation error in the words of a job's parameters."""
    name = ".".join(str(part) for part in error["loc"][1:])
    if error["type"] == "missing":
        return f"a {kind} job needs the parameter {name!r}"
    if error["type"] == "extra_forbidden":
        return f"unknown parameter {name!r} for a {kind} job"
    return f"parameter {name!r}: {error['msg']}"


def _relative(base: Path, path: Path) -> str:
    relative = relative_to(base, path)
    return "" if relative == "." else relative
