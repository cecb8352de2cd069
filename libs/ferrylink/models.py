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
