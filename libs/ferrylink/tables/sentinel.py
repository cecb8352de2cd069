"""Sentinel link. Endpoints are configuration (always the shared database). The link data
(cycles, legs, the record log and each endpoint's position in it) is shared in active_active
and passive, and lives in a node-local SQLite file in passive_legacy."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import BigInteger, Field, SQLModel

from ferrylink.clock import utcnow


class SentinelEndpoint(SQLModel, table=True):
    """A tracking system transfer states are POSTed to."""

    __tablename__ = "sentinel_endpoint"
    # Ids are never reused, so a new endpoint never inherits an old one's position and counts.
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=64)
    url: str = Field(max_length=2048)
    paused: bool = Field(default=False)
    batch_size: int = Field(default=100)
    # Backlog bounds; past them the oldest records are dropped and counted.
    max_backlog: int = Field(default=100_000)
    max_age_seconds: float = Field(default=7 * 86400.0)
    created_at: datetime = Field(default_factory=utcnow)


class SentinelCycle(SQLModel, table=True):
    """One file's journey: the next sequence number of its records."""

    __tablename__ = "sentinel_cycle"

    cycle_id: str = Field(primary_key=True, max_length=64)
    next_seq: int = Field(default=1)
    updated_at: float = Field(index=True)


class SentinelLeg(SQLModel, table=True):
    """The current state of each leg of a cycle: the linked state of the highest revision
    (a state that arrives after a later one is linked, marked superseded, and leaves it)."""

    __tablename__ = "sentinel_leg"

    leg_key: str = Field(primary_key=True, max_length=200)
    cycle_id: str = Field(index=True, max_length=64)
    status: str = Field(max_length=16)
    seq: int
    updated_at: float
    revision: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class SentinelRecord(SQLModel, table=True):
    """A transfer state as linked: its id (`<leg_key>:<status>`, the receivers' idempotency
    key) makes a redelivered state a no-op. Records form one log in `pos` order (link order:
    each transaction appends after the highest, and the unique index makes a concurrent
    linker start again), which every endpoint reads from its own position."""

    __tablename__ = "sentinel_record"

    id: str = Field(primary_key=True, max_length=220)
    cycle_id: str = Field(index=True, max_length=64)
    seq: int
    body_json: str
    linked_at: float  # read in `pos` order (the age bound): no index of its own
    pos: int = Field(sa_type=BigInteger, unique=True, index=True)


class SentinelDelivery(SQLModel, table=True):
    """Where one endpoint is in the record log, and its delivery status (link data: next to
    the records). Records up to `through_pos` are delivered or dropped; its backlog is the
    records after it."""

    __tablename__ = "sentinel_delivery"

    endpoint_id: int = Field(primary_key=True)
    dropped: int = Field(default=0, sa_type=BigInteger)
    delivered: int = Field(default=0, sa_type=BigInteger)
    failures: int = Field(default=0)
    last_success_at: float | None = Field(default=None)
    last_error: str = Field(default="", max_length=1000)
    last_error_at: float | None = Field(default=None)
    through_pos: int = Field(default=0, sa_type=BigInteger)
