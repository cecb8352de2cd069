"""The cluster's own state: its servers and settings, the coordinator's lease, who is primary
under which epoch, and where each service's API is."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from ferrylink.clock import utcnow


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


class ServiceUrl(SQLModel, table=True):
    """Where each service of each server answers HTTP, written by the service at start: a
    server forwards requests only the primary can serve to the primary's service here."""

    __tablename__ = "service_url"

    node_id: str = Field(primary_key=True, max_length=64)
    service: str = Field(primary_key=True, max_length=64)
    url: str = Field(max_length=512)
    updated_at: datetime = Field(default_factory=utcnow)
