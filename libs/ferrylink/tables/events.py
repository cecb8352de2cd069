"""The bookkeeping that makes event processing idempotent: processed events, claims, and events
parked as dead letters."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from ferrylink.clock import utcnow


class ProcessedEvent(SQLModel, table=True):
    """One row per event a transaction manager completed: the idempotency key.

    The unique event id makes a redelivered event (after a crash or a failover) a no-op.
    """

    __tablename__ = "processed_event"

    event_id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(max_length=64)
    node_id: str = Field(max_length=64, index=True)
    processed_at: float = Field(index=True)


class EventClaim(SQLModel, table=True):
    """Who is working on an event now: taken before any side effect, so two copies of one
    event (a re-published message, an overlap around a failover) never act at once.

    `expires_at` is on the database clock and renewed at every step; a claim whose owner
    died is taken over once expired. `attempts` counts the handler's own failures (not
    redeliveries after a cancel, a reconnect or an infrastructure error)."""

    __tablename__ = "event_claim"

    event_id: str = Field(primary_key=True, max_length=64)
    owner: str = Field(default="", max_length=128)
    expires_at: float = Field(default=0.0)
    attempts: int = Field(default=0)
    last_error: str = Field(default="", max_length=2000)


class DeadEvent(SQLModel, table=True):
    """A message parked on a dead-letter queue, kept for `GET /events/dead` and replay."""

    __tablename__ = "dead_event"

    id: str = Field(primary_key=True, max_length=64)
    queue: str = Field(max_length=255)
    reason: str = Field(default="", max_length=1000)
    body: bytes
    headers_json: str = Field(default="{}")
    dead_at: datetime = Field(default_factory=utcnow, index=True)
    replayed_at: datetime | None = Field(default=None)
