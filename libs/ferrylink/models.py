"""SQLModel tables shared by the services. Each service's own tables are added here too, so
that the whole schema is created in one place and the services never import each other."""

from __future__ import annotations

from datetime import UTC, datetime

from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


class ClusterServer(SQLModel, table=True):
    """One entry of the ordered servers list; `position` decides promotion order."""

    __tablename__ = "cluster_server"

    id: str = Field(primary_key=True, max_length=64)
    position: int = Field(index=True)
    api_url: str = Field(default="", max_length=512)


class ClusterSetting(SQLModel, table=True):
    """Cluster-wide settings (mode, connection timeout, config version) as key/value rows."""

    __tablename__ = "cluster_setting"

    key: str = Field(primary_key=True, max_length=64)
    value: str = Field(max_length=1024)
    updated_at: datetime = Field(default_factory=utcnow)


class LeaderLease(SQLModel, table=True):
    """The coordinator leadership lease: one row, taken over only once it expired.

    A committed renewal is what lets the leader issue assignments (DESIGN.md: a leader that
    cannot renew stops issuing at once). `term` grows on every change of holder.
    """

    __tablename__ = "leader_lease"

    id: int = Field(default=1, primary_key=True)
    holder: str = Field(default="", max_length=64)
    expires_at: float = Field(default=0.0)
    term: int = Field(default=0)


class ClusterState(SQLModel, table=True):
    """Who is primary, under which epoch; written only by the lease holder."""

    __tablename__ = "cluster_state"

    id: int = Field(default=1, primary_key=True)
    epoch: int = Field(default=0)
    primary: str | None = Field(default=None, max_length=64)
    # The latest expiry of any assignment issued so far: a new primary starts after it.
    issued_until: float = Field(default=0.0)
    assignment_json: str = Field(default="")


class ProcessedEvent(SQLModel, table=True):
    """One row per event a transaction manager completed: the idempotency key.

    The unique event id makes a redelivered event (after a crash or a failover) a no-op.
    """

    __tablename__ = "processed_event"

    event_id: str = Field(primary_key=True, max_length=64)
    kind: str = Field(max_length=64)
    node_id: str = Field(max_length=64, index=True)
    processed_at: float = Field(index=True)
