"""The cluster configuration's version: bumped on every change, reported in heartbeats.

A server whose services all run the current version is synchronized; the coordinator gives
work only to synchronized servers (DESIGN.md, "Synchronization").
"""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlmodel import Session

from ferrylink.clock import utcnow
from ferrylink.tables.cluster import ClusterSetting

CONFIG_VERSION_KEY = "config_version"


def read_config_version(engine: Engine) -> int:
    with Session(engine) as session:
        row = session.get(ClusterSetting, CONFIG_VERSION_KEY)
        return int(row.value) if row else 0


def bump_config_version(session: Session) -> int:
    """Increment the version inside the caller's transaction (commit is the caller's)."""
    row = session.get(ClusterSetting, CONFIG_VERSION_KEY)
    if row is None:
        row = ClusterSetting(key=CONFIG_VERSION_KEY, value="0")
    row.value = str(int(row.value) + 1)
    row.updated_at = utcnow()
    session.add(row)
    return int(row.value)


def sentinel_undelivered_key(node: str) -> str:
    """Where a passive_legacy sentinel link reports how many of its records (node-local
    link data) some endpoint has not received yet; a manual failover reports them lost."""
    return f"sentinel_link.undelivered.{node}"


def write_sentinel_undelivered(session: Session, node: str, count: int) -> None:
    """Store the count in the caller's transaction (commit is the caller's)."""
    key = sentinel_undelivered_key(node)
    row = session.get(ClusterSetting, key) or ClusterSetting(key=key, value="0")
    row.value = str(count)
    row.updated_at = utcnow()
    session.add(row)


def read_sentinel_undelivered(session: Session, node: str) -> int:
    row = session.get(ClusterSetting, sentinel_undelivered_key(node), populate_existing=True)
    return int(row.value) if row is not None else 0
