"""Routes, the consolidated transfer log and its step runs, route counters, and the edge's
limits."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import BigInteger, Field, SQLModel

from ferrylink.clock import utcnow


class Route(SQLModel, table=True):
    """For an account and a file-name pattern, the ordered steps a file goes through."""

    __tablename__ = "route"

    id: int | None = Field(default=None, primary_key=True)
    account: str = Field(index=True, max_length=64)
    pattern: str = Field(max_length=255)
    # Routes of an account are tried in ascending position; the first match wins.
    position: int = Field(default=0)
    steps_json: str
    enabled: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow)


class Transfer(SQLModel, table=True):
    """One leg of a file's journey; legs of one file share the cycle id."""

    __tablename__ = "transfer"

    id: int | None = Field(default=None, primary_key=True)
    # Unique: a leg is recorded once even when its event is processed again.
    leg_key: str = Field(unique=True, max_length=200)
    cycle_id: str = Field(index=True, max_length=64)
    event_id: str = Field(index=True, max_length=64)
    leg: str = Field(max_length=64)
    direction: str = Field(index=True, max_length=16)  # inbound | outbound | internal
    account: str = Field(index=True, max_length=64)
    file_name: str = Field(index=True, max_length=1024)
    bytes: int = Field(default=0)
    protocol: str = Field(max_length=16)
    partner: str | None = Field(default=None, max_length=64)
    status: str = Field(index=True, max_length=16)
    node_id: str = Field(max_length=64)
    started_at: datetime = Field(default_factory=utcnow, index=True)
    finished_at: datetime | None = Field(default=None)
    duration_ms: int | None = Field(default=None)
    detail: str = Field(default="", max_length=2000)
    # One more at each state change (1 for the first): orders the leg's transfer states.
    revision: int = Field(default=0, sa_column_kwargs={"server_default": "0"})


class StepRun(SQLModel, table=True):
    """A route step completed for an event: a redelivered event skips it (and reuses its
    result, e.g. the renamed path), so no step runs twice."""

    __tablename__ = "step_run"

    event_id: str = Field(primary_key=True, max_length=64)
    step_index: int = Field(primary_key=True)
    # "planned" (result chosen, side effect may be under way) or "done".
    status: str = Field(default="planned", max_length=16)
    result: str = Field(default="", max_length=4096)
    finished_at: datetime = Field(default_factory=utcnow)


class RouteCounter(SQLModel, table=True):
    """The `{counter}` of a route: incremented by one statement inside the write transaction
    that records the step's plan (INSERT .. ON CONFLICT DO UPDATE .. RETURNING), so two
    events never get the same value, on SQLite and PostgreSQL alike."""

    __tablename__ = "route_counter"

    route_id: int = Field(primary_key=True)
    value: int = Field(default=0, sa_type=BigInteger)


class EdgeLimits(SQLModel, table=True):
    """Limits every edge applies to partner sessions (one row, id 1; 0 means no limit).
    Edges hold no database: a backend reads this row at each login and sends it with the
    login's answer, so a change applies to every new session on every edge at once."""

    __tablename__ = "edge_limits"

    id: int = Field(default=1, primary_key=True)
    sessions_per_account: int = Field(default=0)  # concurrent sessions of one account, per edge
    idle_timeout_s: int = Field(default=0)  # an SFTP session without a request for this long
    max_file_bytes: int = Field(default=0, sa_type=BigInteger)  # one uploaded file
    quota_bytes: int = Field(default=0, sa_type=BigInteger)  # all files in one account's home
    updated_at: datetime = Field(default_factory=utcnow)
