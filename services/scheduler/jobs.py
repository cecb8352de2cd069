"""What a scheduled job is: its trigger (cron or interval, in a time zone), its kind and
parameters, and the event each fire time submits to the event queue.

Kept free of the running scheduler so that the API (on any server) and the scheduler (on the
primary) agree on every fire time: cron fire times fall on whole seconds, and interval
triggers count from the job's stored `start_at`, never from "when this server started".
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from sqlmodel import Session

from ferrylink.events import Event
from ferrylink.models import Account, Partner, ScheduledJob
from ferrylink.paths import PathError, confined, in_data_dir, relative_to

TRANSFER_KINDS = ("pull", "push")
MAINTENANCE_KINDS = (
    "transfer_log_purge",  # delete transfer-log records older than `days`
    "transfer_log_archive",  # write them to a JSON-lines file under `folder`, then delete
    "dead_letter_purge",  # delete dead-letter entries older than `days`
    "temp_file_cleanup",  # delete temporary files older than `max_age_hours` under `folder`
)
KINDS = TRANSFER_KINDS + MAINTENANCE_KINDS

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


def as_utc(moment: datetime) -> datetime:
    """Aware UTC (a zone-less value is taken as UTC already)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


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


def run_event(job: ScheduledJob, fire_time: datetime) -> Event:
    assert job.id is not None
    event_id = run_event_id(job.id, fire_time)
    params: dict[str, str] = json.loads(job.params_json)
    params.update(
        task=job.kind, job_id=str(job.id), job_name=job.name,
        fire_time=as_utc(fire_time).isoformat(),
    )  # fmt: skip
    return Event(
        id=event_id,
        kind="transfer.scheduled" if job.kind in TRANSFER_KINDS else "maintenance.run",
        account=params.get("account", ""),
        path=params.get("folder", ""),
        cycle_id=event_id,
        params=params,
    )


# --------------------------------------------------------------------------------------------
# Parameters per kind
# --------------------------------------------------------------------------------------------

_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _boolean(name: str, value: str) -> str:
    if value.lower() in _TRUE:
        return "true"
    if value.lower() in _FALSE:
        return "false"
    raise JobError(f"parameter {name!r} must be true or false, not {value!r}")


def _positive(kind: type[int] | type[float]) -> Callable[[str, str], str]:
    def check(name: str, value: str) -> str:
        try:
            number = kind(value)
        except ValueError:
            raise JobError(f"parameter {name!r} must be a number, not {value!r}") from None
        if number <= 0:
            raise JobError(f"parameter {name!r} must be greater than 0")
        return str(number)

    return check


def _name_pattern(name: str, value: str) -> str:
    if not value or "/" in value or "\\" in value:
        raise JobError(f"parameter {name!r} is a file-name pattern; it may not contain '/'")
    return value


# Names a cleanup pattern may never match.
ORDINARY_FILES = ("anything", "data.csv", "report.pdf", "orders.xml", "archive.tar.gz",
                  "ferrylink.db", "README", "x.txt", "image.png")  # fmt: skip


def _patterns(name: str, value: str) -> str:
    patterns = [p.strip() for p in value.split(",") if p.strip()]
    if not patterns:
        raise JobError(f"parameter {name!r} needs at least one pattern")
    for pattern in patterns:
        _name_pattern(name, pattern)
    for pattern in patterns:
        # What the pattern requires literally, wildcards and bracket sets left out: a
        # deleting job must name a kind of file (".part", "~"), not "anything with a dot".
        literal = re.sub(r"\[[^\]]*\]|[*?]", "", pattern).replace(".", "")
        ordinary = [f for f in ORDINARY_FILES if fnmatch.fnmatchcase(f, pattern)]
        if not literal or ordinary:
            example = f" (it matches {ordinary[0]!r})" if ordinary else ""
            raise JobError(
                f"parameter {name!r}: pattern {pattern!r} would match every file, or "
                f"nearly{example}; name the temporary files, e.g. '*.part'"
            )
    return ",".join(patterns)


def _text(name: str, value: str) -> str:
    return value


# kind -> parameter -> (default, check); None as default means required.
_Check = Callable[[str, str], str]
PARAMETERS: dict[str, dict[str, tuple[str | None, _Check]]] = {
    "pull": {
        "partner": (None, _text), "account": (None, _text), "folder": ("", _text),
        "pattern": ("*", _name_pattern), "delete_remote": ("false", _boolean),
    },
    "push": {
        "partner": (None, _text), "account": (None, _text), "folder": ("", _text),
        "pattern": ("*", _name_pattern), "delete_local": ("false", _boolean),
    },
    "transfer_log_purge": {"days": ("30", _positive(int))},
    "transfer_log_archive": {
        "days": ("30", _positive(int)), "folder": ("archive/transfer-log", _text),
    },
    "dead_letter_purge": {"days": ("30", _positive(int))},
    "temp_file_cleanup": {
        "folder": ("", _text), "max_age_hours": ("24", _positive(float)),
        "patterns": ("*.part,*.tmp", _patterns),
    },
}  # fmt: skip


def check_params(
    kind: str, given: dict[str, Any], session: Session, data_dir: Path
) -> dict[str, str]:
    """The job's parameters with defaults filled in, normalized; JobError names the problem.

    Folders are stored relative: to the account's home for transfers, to the data directory
    for maintenance.
    """
    spec = PARAMETERS.get(kind)
    if spec is None:
        raise JobError(f"unknown job kind {kind!r}; known: {', '.join(KINDS)}")
    unknown = sorted(set(given) - set(spec))
    if unknown:
        raise JobError(
            f"unknown parameter(s) {', '.join(unknown)} for a {kind} job; known: {', '.join(spec)}"
        )
    params: dict[str, str] = {}
    for name, (default, check) in spec.items():
        value = given.get(name, default)
        if value is None:
            raise JobError(f"a {kind} job needs the parameter {name!r}")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        params[name] = check(name, text)

    try:
        if kind in TRANSFER_KINDS:
            if session.get(Partner, params["partner"]) is None:
                raise JobError(f"unknown partner {params['partner']!r}")
            account = session.get(Account, params["account"])
            if account is None:
                raise JobError(f"unknown account {params['account']!r}")
            home = confined(data_dir.resolve(), account.home)
            params["folder"] = _relative(home, confined(home, params["folder"]))
        elif "folder" in params:
            params["folder"] = _relative(data_dir, in_data_dir(data_dir, params["folder"]))
    except PathError as exc:
        raise JobError(str(exc)) from exc
    return params


def _relative(base: Path, path: Path) -> str:
    relative = relative_to(base, path)
    return "" if relative == "." else relative
