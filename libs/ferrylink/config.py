"""The cluster configuration's version: bumped on every change, reported in heartbeats.

A server whose services all run the current version is synchronized; the coordinator gives
work only to synchronized servers (DESIGN.md, "Synchronization").
"""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlmodel import Session

from ferrylink.models import ClusterSetting, utcnow

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
