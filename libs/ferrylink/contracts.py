"""Every message that crosses a process, as a typed, versioned class.

A message is JSON with a `schema_version`. A receiver reads the versions it knows and parks
anything else on the dead-letter queue with the reason (`RejectMessage`), so a newer
sender never makes an older receiver guess. Events are a discriminated union on `kind`;
handlers dispatch with `match` and `assert_never`, so a new kind that a handler forgets is a
type error, not a silent drop.

The work-unit names and cluster modes are part of the wire format (assignments list them),
so they are spelled here, once.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import time
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from ferrylink.clock import utcnow

SCHEMA_VERSION: Literal[1] = 1


class RejectMessage(Exception):
    """A message that can never succeed (malformed, unknown version or kind): it goes to the
    dead-letter queue at once, with this exception's text as the reason."""


class RetryLater(Exception):
    """A message to try again later (another copy holds its claim, the database or a partner
    is unreachable, a step must wait): in `delay` seconds, or None for the consumer's
    backoff by how often the message came back already. The consumer parks it in its
    queue's delay queue (confirmed, then acked): no worker sleeps, and the broker's delivery
    count does not grow."""

    def __init__(self, reason: str, delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


# --------------------------------------------------------------------------------------------
# Cluster vocabulary
# --------------------------------------------------------------------------------------------


class ClusterMode(StrEnum):
    ACTIVE_ACTIVE = "active_active"
    PASSIVE = "passive"
    PASSIVE_LEGACY = "passive_legacy"


CLUSTER_MODES: tuple[str, ...] = tuple(mode.value for mode in ClusterMode)

# Work units. A service registers the ones it implements; the coordinator assigns them.
WORK_EVENTS = "transaction-manager.events"  # the shared event queue
WORK_EVENTS_LOCAL = "transaction-manager.events-local"  # a node's own queue (passive_legacy)
WORK_TRANSFER_LOG = "transaction-manager.transfer-log"  # serving the consolidated log
WORK_DEAD_LETTERS = "transaction-manager.dead-letters"  # keeping parked events for the API
# Keeping the parked events of a node's own queue (passive_legacy): every live server.
WORK_DEAD_LETTERS_LOCAL = "transaction-manager.dead-letters-local"
WORK_FOLDER_MONITOR = "folder-monitor.watch"
WORK_SCHEDULER = "scheduler.jobs"
WORK_SENTINEL_LINK = "sentinel-link.deliver"

# Work that at most one server may run at a time; it self-fences when assignments stop.
PRIMARY_ONLY_WORK: frozenset[str] = frozenset(
    {WORK_TRANSFER_LOG, WORK_DEAD_LETTERS, WORK_FOLDER_MONITOR, WORK_SCHEDULER, WORK_SENTINEL_LINK}
)


# --------------------------------------------------------------------------------------------
# Statuses stored in the database and carried in messages
# --------------------------------------------------------------------------------------------


class TransferStatus(StrEnum):
    """The reference's vocabulary for a transfer leg's state."""

    TO_EXECUTE = "TO_EXECUTE"
    RECEIVING = "RECEIVING"
    RECEIVED = "RECEIVED"
    ROUTED = "ROUTED"
    SENDING = "SENDING"
    SENT = "SENT"
    FAILED = "FAILED"
    CANCELED = "CANCELED"
    AVAILABLE = "AVAILABLE"
    ACKED = "ACKED"
    FORWARDED = "FORWARDED"


FINAL_TRANSFER_STATUSES: frozenset[TransferStatus] = frozenset(
    {
        TransferStatus.RECEIVED,
        TransferStatus.ROUTED,
        TransferStatus.SENT,
        TransferStatus.FAILED,
        TransferStatus.CANCELED,
    }
)


class StepRunStatus(StrEnum):
    PLANNED = "planned"
    DONE = "done"
    FAILED = "failed"


class JobRunStatus(StrEnum):
    CLAIMED = "claimed"  # event not yet confirmed by the broker
    SUBMITTED = "submitted"  # event on the queue
    DONE = "done"  # the transaction manager completed it
    MISSED = "missed"  # past its misfire grace


class ScheduledFileStatus(StrEnum):
    FETCHED = "fetched"  # pulled, file.arrived not yet confirmed
    PUBLISHED = "published"  # file.arrived confirmed
    REMOVED = "removed"  # deleted at the partner after the pull
    SENT = "sent"  # pushed
    DELETED = "deleted"  # deleted locally after the push


# --------------------------------------------------------------------------------------------
# Base
# --------------------------------------------------------------------------------------------


class Contract(BaseModel):
    """A message: strict (unknown fields are an error) and versioned."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


M = TypeVar("M")


def parse(contract: type[M] | TypeAdapter[M], body: bytes) -> M:
    """Read a message; an unknown version or an invalid body raises RejectMessage with a
    reason a human can act on."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RejectMessage(f"invalid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RejectMessage("a message must be a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RejectMessage(
            f"unknown schema version {version!r} (this server reads {SCHEMA_VERSION})"
        )
    adapter = contract if isinstance(contract, TypeAdapter) else TypeAdapter(contract)
    try:
        return adapter.validate_python(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'message'}: {e['msg']}" for e in exc.errors()
        )
        raise RejectMessage(f"invalid message: {problems}") from exc


# --------------------------------------------------------------------------------------------
# Scheduled jobs: the parameters of each kind (the API validates with these too)
# --------------------------------------------------------------------------------------------


def _check_name_pattern(pattern: str) -> str:
    if not pattern or "/" in pattern or "\\" in pattern:
        raise ValueError("a file-name pattern may not be empty or contain '/'")
    return pattern


class _JobParams(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PullJob(_JobParams):
    """Fetch the files matching `pattern` from a partner into an account's folder."""

    kind: Literal["pull"] = "pull"
    partner: str = Field(min_length=1, max_length=128)
    account: str = Field(min_length=1, max_length=128)
    folder: str = Field(default="", max_length=4096)  # relative to the account's home
    pattern: str = Field(default="*", max_length=255)
    delete_remote: bool = False

    _pattern = field_validator("pattern")(_check_name_pattern)


class PushJob(_JobParams):
    """Send the files matching `pattern` from an account's folder to a partner."""

    kind: Literal["push"] = "push"
    partner: str = Field(min_length=1, max_length=128)
    account: str = Field(min_length=1, max_length=128)
    folder: str = Field(default="", max_length=4096)
    pattern: str = Field(default="*", max_length=255)
    delete_local: bool = False

    _pattern = field_validator("pattern")(_check_name_pattern)


class TransferLogPurge(_JobParams):
    kind: Literal["transfer_log_purge"] = "transfer_log_purge"
    days: int = Field(default=30, gt=0)


class TransferLogArchive(_JobParams):
    kind: Literal["transfer_log_archive"] = "transfer_log_archive"
    days: int = Field(default=30, gt=0)
    folder: str = Field(default="archive/transfer-log", max_length=4096)  # in the data dir


class DeadLetterPurge(_JobParams):
    kind: Literal["dead_letter_purge"] = "dead_letter_purge"
    days: int = Field(default=30, gt=0)


class AuditLogPurge(_JobParams):
    """Delete audit records older than `days` (a year by default: audits look back)."""

    kind: Literal["audit_log_purge"] = "audit_log_purge"
    days: int = Field(default=365, gt=0)


# Bounds of the age (days) of the purges of bookkeeping tables. At least a day: the rows they
# remove may be needed while a copy of their message can still come back (the redelivery
# window: delay queues up to 30 s, the outbox relay and the scheduler's re-publishing of
# claimed runs until the broker answers), and each purge keeps explicitly what such a
# pending copy needs (services/transaction_manager/purges.py).
MIN_PURGE_DAYS = 1
MAX_PURGE_DAYS = 3650


class _BookkeepingPurge(_JobParams):
    days: int = Field(default=30, ge=MIN_PURGE_DAYS, le=MAX_PURGE_DAYS)


class JobRunPurge(_BookkeepingPurge):
    """Delete finished job runs (submitted, done, missed) fired more than `days` ago; never a
    job's latest run nor a claimed one."""

    kind: Literal["job_run_purge"] = "job_run_purge"


class ScheduledFilePurge(_BookkeepingPurge):
    """Delete records of scheduled pulls/pushes done more than `days` ago whose file is gone
    at its source (removed at the partner, deleted locally) or whose job no longer exists."""

    kind: Literal["scheduled_file_purge"] = "scheduled_file_purge"


class EventClaimPurge(_BookkeepingPurge):
    """Delete the exactly-once bookkeeping of events completed more than `days` ago
    (processed_event and step_run rows) and event claims no one held for `days`; never what a
    copy of an event that may still come needs."""

    kind: Literal["event_claim_purge"] = "event_claim_purge"


class OutboxPurge(_BookkeepingPurge):
    """Move outbox messages no relay could publish for `days` to the dead letters (listed,
    replayable); confirmed messages leave the outbox at once."""

    kind: Literal["outbox_purge"] = "outbox_purge"
    days: int = Field(default=7, ge=MIN_PURGE_DAYS, le=MAX_PURGE_DAYS)


class SentinelLinkPurge(_BookkeepingPurge):
    """Delete the link data (cycle, legs, records) of cycles quiet for `days` whose records
    every endpoint has received (or dropped by its bounds)."""

    kind: Literal["sentinel_link_purge"] = "sentinel_link_purge"


# Names a cleanup pattern may never match.
ORDINARY_FILES = ("anything", "data.csv", "report.pdf", "orders.xml", "archive.tar.gz",
                  "ferrylink.db", "README", "x.txt", "image.png")  # fmt: skip


class TempFileCleanup(_JobParams):
    kind: Literal["temp_file_cleanup"] = "temp_file_cleanup"
    folder: str = Field(default="", max_length=4096)  # in the data dir
    max_age_hours: float = Field(default=24.0, gt=0)
    patterns: list[str] = Field(default_factory=lambda: ["*.part", "*.tmp"], min_length=1)

    @field_validator("patterns", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return (
            [p.strip() for p in value.split(",") if p.strip()] if isinstance(value, str) else value
        )

    @field_validator("patterns")
    @classmethod
    def _safe(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            _check_name_pattern(pattern)
            # What the pattern requires literally, wildcards and bracket sets left out: a
            # deleting job must name a kind of file (".part", "~"), not "anything with a dot".
            literal = re.sub(r"\[[^\]]*\]|[*?]", "", pattern).replace(".", "")
            ordinary = [f for f in ORDINARY_FILES if fnmatch.fnmatchcase(f, pattern)]
            if not literal or ordinary:
                example = f" (it matches {ordinary[0]!r})" if ordinary else ""
                raise ValueError(
                    f"pattern {pattern!r} would match every file, or nearly{example}; name "
                    "the temporary files, e.g. '*.part'"
                )
        return patterns


TransferJob = Annotated[PullJob | PushJob, Field(discriminator="kind")]
MaintenanceTask = Annotated[
    TransferLogPurge
    | TransferLogArchive
    | DeadLetterPurge
    | TempFileCleanup
    | AuditLogPurge
    | JobRunPurge
    | ScheduledFilePurge
    | EventClaimPurge
    | OutboxPurge
    | SentinelLinkPurge,
    Field(discriminator="kind"),
]
# A job is a transfer or a maintenance task: one tagged union (pydantic flattens the two).
JobParams = Annotated[PullJob | PushJob | MaintenanceTask, Field(discriminator="kind")]
JOB_PARAMS: TypeAdapter[JobParams] = TypeAdapter(JobParams)
TRANSFER_JOB_KINDS: tuple[str, ...] = ("pull", "push")
MAINTENANCE_KINDS: tuple[str, ...] = tuple(
    model.model_fields["kind"].default for model in get_args(get_args(MaintenanceTask)[0])
)
JOB_KINDS: tuple[str, ...] = TRANSFER_JOB_KINDS + MAINTENANCE_KINDS


# --------------------------------------------------------------------------------------------
# Events: the work on the event queue
# --------------------------------------------------------------------------------------------


def new_id() -> str:
    """A unique id that sorts by creation time: UUID version 7 (RFC 9562) as 32 hex digits,
    the Unix time in milliseconds first, then 74 random bits.

    Events, cycles, legs and sentinel records are keyed by ids derived from these, in
    B-tree indexes. Random ids (version 4) put each new key on a random index page, so a
    commit of a few hundred rows rewrote nearly every leaf page of each index (and the
    SQLite WAL and its checkpoints grew with the database); ids in time order land on the
    last pages: linking a state cost half as much in the sentinel link's microbenchmark."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")  # 80 bits; 74 used
    value = (millis & 0xFFFF_FFFF_FFFF) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 68) << 64  # rand_a: 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b: 62 bits
    return f"{value:032x}"


class _EventBase(Contract):
    id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    # Links the legs of one file's journey (the sentinel link's cycle id).
    cycle_id: str = Field(default_factory=new_id, min_length=1, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)


class FileArrived(_EventBase):
    """A file is complete in an account's home (uploaded, or found by the folder monitor)."""

    kind: Literal["file.arrived"] = "file.arrived"
    account: str = Field(min_length=1, max_length=128)
    path: str = Field(min_length=1, max_length=4096)  # relative to the data directory
    size: int | None = Field(default=None, ge=0)
    checksum: str | None = Field(default=None, max_length=128)
    # How it arrived: file (folder monitor), http, sftp, or the scheduler's protocol.
    protocol: str = Field(default="file", max_length=16)


class _ScheduledBase(_EventBase):
    job_id: int = Field(ge=0)
    job_name: str = Field(default="", max_length=128)
    fire_time: datetime


class TransferScheduled(_ScheduledBase):
    """One fire time of a scheduled pull or push."""

    kind: Literal["transfer.scheduled"] = "transfer.scheduled"
    job: TransferJob


class MaintenanceRun(_ScheduledBase):
    """One fire time of a maintenance application."""

    kind: Literal["maintenance.run"] = "maintenance.run"
    task: MaintenanceTask


Event = Annotated[FileArrived | TransferScheduled | MaintenanceRun, Field(discriminator="kind")]
EVENT: TypeAdapter[Event] = TypeAdapter(Event)


def parse_event(body: bytes) -> Event:
    return parse(EVENT, body)


# --------------------------------------------------------------------------------------------
# Transfer states: every leg's state change, for the sentinel link
# --------------------------------------------------------------------------------------------


class TransferState(Contract):
    """A leg of a file's journey entered a state (transaction manager -> sentinel link). At
    least once: a receiver drops repeats by `id` (leg key, state and revision)."""

    leg_key: str = Field(min_length=1, max_length=200)
    cycle_id: str = Field(min_length=1, max_length=64)
    event_id: str = Field(max_length=64)
    leg: str = Field(max_length=64)
    state: TransferStatus
    account: str = Field(default="", max_length=64)
    file_name: str = Field(default="", max_length=1024)
    bytes: int = 0
    direction: str = Field(default="", max_length=16)
    protocol: str = Field(default="", max_length=16)
    partner: str | None = None
    node: str = Field(max_length=64)
    at: datetime = Field(default_factory=utcnow, description="When the state was recorded.")
    detail: str = Field(default="", max_length=2000)
    revision: int = Field(
        default=0,
        ge=0,
        description="The leg's state change number: 1 for its first state, one more for each "
        "change (a resubmitted leg reaches a state again with a new revision). It orders a "
        "leg's states whatever order they arrive in. 0: sent before revisions existed.",
    )

    @property
    def id(self) -> str:
        return transfer_state_id(self.leg_key, self.state.value, self.revision)


def transfer_state_id(leg_key: str, status: str, revision: int) -> str:
    """The id of a leg's state (receivers drop repeats by it), e.g. from a transfer-log row:
    `<leg_key>:<status>:<revision>`, or `<leg_key>:<status>` for revision 0 (sent before
    revisions existed)."""
    if revision == 0:
        return f"{leg_key}:{status}"
    return f"{leg_key}:{status}:{revision}"


# At most this many states in one `TransferStates` message (a batch commit with more is sent
# as several messages): ~1 KB a state keeps a message well under the broker's frame sizes.
TRANSFER_STATES_PER_MESSAGE = 500


class TransferStates(Contract):
    """Transfer states committed together (a batch of events' commit), in the order they were
    recorded: one message instead of one per state, so a busy transaction manager pays the
    broker's per-message cost once per commit. The sentinel link reads them as if they had
    come one by one, in this order."""

    kind: Literal["transfer.states"] = "transfer.states"
    states: list[TransferState] = Field(min_length=1, max_length=TRANSFER_STATES_PER_MESSAGE)

    @property
    def id(self) -> str:
        # The outbox and the broker tell repeats apart by it; receivers by each state's id.
        return f"states:{self.states[0].id}:{len(self.states)}"


def _state_message_tag(value: Any) -> str:
    if isinstance(value, dict):
        return "many" if "states" in value else "one"
    return "many" if isinstance(value, TransferStates) else "one"


# What the transfer-states queue carries: one state (uploads, pushes, the scheduler's
# transfers) or the states of a batch commit.
StateMessage = Annotated[
    Annotated[TransferState, Tag("one")] | Annotated[TransferStates, Tag("many")],
    Discriminator(_state_message_tag),
]
STATE_MESSAGE: TypeAdapter[StateMessage] = TypeAdapter(StateMessage)


def states_of(message: TransferState | TransferStates) -> list[TransferState]:
    """The states a transfer-states message carries, in order."""
    return message.states if isinstance(message, TransferStates) else [message]


# --------------------------------------------------------------------------------------------
# Cluster: heartbeats, assignments, configuration changes
# --------------------------------------------------------------------------------------------


class Heartbeat(Contract):
    """What every service broadcasts each heartbeat period: alive, and what it runs."""

    node: str
    service: str
    pid: int
    sent_at: float
    epoch: int | None = None
    active: list[str] = Field(default_factory=list)
    config_version: int = 0
    # Where the service's API answers (FerrylinkSettings.api_url); "" from older senders.
    api_url: str = Field(default="", max_length=512)


class Assignment(Contract):
    """The coordinator's whole desired state, published on every heartbeat period.

    A service acts on the newest epoch it has seen and stops its primary-only work when the
    assignment has expired (self-fencing); it starts primary-only work only from `not_before`,
    which the leader sets past every earlier assignment's expiry when the primary changes.
    """

    epoch: int = Field(ge=0)
    mode: ClusterMode
    leader: str
    primary: str | None
    work: dict[str, list[str]]
    issued_at: float
    not_before: float
    expires_at: float

    def work_for(self, node_id: str, now: float, latest: float | None = None) -> set[str]:
        """The work `node_id` may run under this assignment when the time (on the clock the
        assignment's times are on: the database's) is between `now` and `latest` (one
        moment when `latest` is None): primary-only work only if the grant has surely begun
        and surely not yet run out."""
        latest = now if latest is None else latest
        if latest >= self.expires_at:
            # Expired: keep only work that is safe on any number of servers.
            return {w for w in self.work.get(node_id, []) if w not in PRIMARY_ONLY_WORK}
        units = set(self.work.get(node_id, []))
        if now < self.not_before:
            units -= PRIMARY_ONLY_WORK
        return units


class ConfigChanged(Contract):
    """The configuration changed; the database holds it (receivers reload it).

    A dynamic change (`full_sync` false) is applied by every process that is synchronized
    already; a process that started or came back waits for a full sync (`full_sync` true,
    from `POST /cluster/sync` or the coordinator leader), addressed to `nodes` (empty: all).
    """

    version: int = 0
    full_sync: bool = False
    nodes: list[str] = Field(default_factory=list)

    def addressed_to(self, node: str) -> bool:
        return not self.nodes or node in self.nodes


# --------------------------------------------------------------------------------------------
# Where each message goes: a work queue (the runtime picks the shared or, in passive_legacy,
# the node's own) or a fanout exchange that every process hears
# --------------------------------------------------------------------------------------------

_EXCHANGE_OF: dict[type[Contract], str] = {
    Heartbeat: "heartbeats",
    Assignment: "assignments",
    ConfigChanged: "config",
}
_QUEUE_OF: dict[type[Contract], str] = {
    TransferState: "transfer-states",
    TransferStates: "transfer-states",
}


def destination(message: Contract) -> tuple[Literal["queue", "exchange"], str]:
    """("queue" | "exchange", logical name); every event goes to the "events" queue."""
    kind = type(message)
    if kind in _EXCHANGE_OF:
        return "exchange", _EXCHANGE_OF[kind]
    return "queue", _QUEUE_OF.get(kind, "events")


def message_id(message: Contract) -> str:
    """A stable id, so the broker, dead letters and receivers can tell repeats apart."""
    if isinstance(message, TransferState | TransferStates):
        return message.id
    return str(getattr(message, "id", "")) or f"{type(message).__name__}-{uuid.uuid4().hex}"


# --------------------------------------------------------------------------------------------
# Dead letters: why a message was parked, carried in its AMQP headers
# --------------------------------------------------------------------------------------------

REASON_HEADER = "x-ferrylink-reason"
SOURCE_QUEUE_HEADER = "x-ferrylink-source-queue"
DEAD_LETTERED_AT_HEADER = "x-ferrylink-dead-lettered-at"
# How many times a message came back from a delay queue (drives the backoff, not a limit).
RETRIES_HEADER = "x-ferrylink-retries"


class DeadLetterInfo(BaseModel):
    """The headers a parked message carries."""

    reason: str
    source_queue: str
    dead_lettered_at: float

    def to_headers(self) -> dict[str, Any]:
        return {
            REASON_HEADER: self.reason[:1000],
            SOURCE_QUEUE_HEADER: self.source_queue,
            # Epoch milliseconds: AMQP (pika) headers carry integers, not floats.
            DEAD_LETTERED_AT_HEADER: int(self.dead_lettered_at * 1000),
        }

    @classmethod
    def from_headers(cls, headers: dict[str, Any], fallback_queue: str = "") -> DeadLetterInfo:
        """Read our headers, or the broker's own x-death record for a message the broker
        dead-lettered itself (delivery limit)."""
        if REASON_HEADER in headers:
            return cls(
                reason=str(headers[REASON_HEADER]),
                source_queue=str(headers.get(SOURCE_QUEUE_HEADER, fallback_queue)),
                dead_lettered_at=int(headers.get(DEAD_LETTERED_AT_HEADER, 0)) / 1000,
            )
        deaths = headers.get("x-death") or []
        death = deaths[0] if deaths and isinstance(deaths[0], dict) else {}
        reason = death.get("reason", "unknown")
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        queue = death.get("queue", fallback_queue)
        if isinstance(queue, bytes):
            queue = queue.decode(errors="replace")
        when = death.get("time")
        return cls(
            reason=f"broker dead-lettered it: {reason}",
            source_queue=str(queue),
            dead_lettered_at=when.timestamp() if isinstance(when, datetime) else 0.0,
        )
