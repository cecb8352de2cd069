"""The cluster configuration the coordinator owns: the servers list and the cluster settings.

Both live in the shared database; every change bumps the configuration version (see
`ferrylink.config`) and is announced on the `config` exchange: the caller does both
(`ServiceRuntime.commit_config_change`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from ferrylink.clock import utcnow
from ferrylink.cluster import CLUSTER_MODES
from ferrylink.config import bump_config_version
from ferrylink.tables.cluster import ClusterServer, ClusterSetting

log = logging.getLogger(__name__)

MODE_KEY = "cluster.mode"
TIMEOUT_KEY = "cluster.connection_timeout"
FAILOVER_REQUEST_KEY = "cluster.failover_request"
AUTO_SYNC_KEY = "cluster.auto_sync"
# The old primary a handover waits for (empty: none); written by the leader.
HANDOVER_FROM_KEY = "cluster.handover_from"
PAUSED_KEY = "cluster.events_paused"  # JSON list of the servers whose event consumption paused
SERVER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """Invalid cluster configuration; the message says what is wrong."""


@dataclass(frozen=True)
class ServerEntry:
    id: str
    api_url: str = ""


@dataclass(frozen=True)
class ClusterSettings:
    mode: str
    connection_timeout: float
    # The leader syncs a server that starts or comes back by itself; off, an operator runs
    # `ferrylink sync` (the reference's manual synchronization).
    auto_sync: bool = True


def parse_servers_file(text: str) -> list[ServerEntry]:
    """The reference's format: one server a line, its id, optionally a TAB and its API URL."""
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        server_id, _, api_url = line.partition("\t")
        if "\t" not in line and " " in line:
            server_id, _, api_url = line.partition(" ")
        entries.append(ServerEntry(server_id.strip(), api_url.strip()))
        try:
            validate_servers(entries)
        except ConfigError as exc:
            raise ConfigError(f"line {number}: {exc}") from exc
    return entries


def validate_servers(entries: list[ServerEntry]) -> None:
    if not entries:
        raise ConfigError("the servers list must name at least one server")
    seen: set[str] = set()
    for entry in entries:
        if not SERVER_ID.match(entry.id):
            raise ConfigError(
                f"invalid server id {entry.id!r}: use letters, digits, '.', '_' or '-'"
            )
        if entry.id in seen:
            raise ConfigError(f"server {entry.id!r} is listed twice")
        if entry.api_url and not entry.api_url.startswith(("http://", "https://")):
            raise ConfigError(f"API URL of {entry.id!r} must start with http:// or https://")
        seen.add(entry.id)


def validate_settings(mode: str, connection_timeout: float, lease_seconds: float) -> None:
    if mode not in CLUSTER_MODES:
        raise ConfigError(f"unknown cluster mode {mode!r}; use one of {', '.join(CLUSTER_MODES)}")
    if connection_timeout <= lease_seconds:
        raise ConfigError(
            f"connection_timeout must be longer than the {lease_seconds} s lease, so that a "
            "cut-off primary has stopped before another is promoted"
        )


def read_servers(session: Session) -> list[ServerEntry]:
    rows = session.exec(select(ClusterServer).order_by(col(ClusterServer.position))).all()
    return [ServerEntry(row.id, row.api_url) for row in rows]


def write_servers(session: Session, entries: list[ServerEntry]) -> None:
    """Replace the servers list (not committed; the caller bumps the version)."""
    validate_servers(entries)
    session.exec(delete(ClusterServer))
    for position, entry in enumerate(entries):
        session.add(ClusterServer(id=entry.id, position=position, api_url=entry.api_url))


def read_setting(session: Session, key: str) -> str | None:
    row = session.get(ClusterSetting, key, populate_existing=True)
    return row.value if row else None


def put_setting(session: Session, key: str, value: str) -> None:
    row = session.get(ClusterSetting, key) or ClusterSetting(key=key, value=value)
    row.value = value
    row.updated_at = utcnow()
    session.add(row)


def read_paused(session: Session) -> set[str]:
    """The servers an operator paused the event consumption of."""
    value = read_setting(session, PAUSED_KEY)
    return set(json.loads(value)) if value else set()


def set_paused(session: Session, server: str, paused: bool) -> set[str]:
    """Pause or resume `server`'s event consumption (in the caller's transaction)."""
    if server not in {entry.id for entry in read_servers(session)}:
        raise ConfigError(f"no server {server!r} in the servers list")
    current = read_paused(session)
    current = current | {server} if paused else current - {server}
    put_setting(session, PAUSED_KEY, json.dumps(sorted(current)))
    return current


def read_settings(session: Session, default: ClusterSettings) -> ClusterSettings:
    mode = read_setting(session, MODE_KEY) or default.mode
    timeout = read_setting(session, TIMEOUT_KEY)
    auto_sync = read_setting(session, AUTO_SYNC_KEY)
    return ClusterSettings(
        mode,
        float(timeout) if timeout else default.connection_timeout,
        default.auto_sync if auto_sync is None else auto_sync == "true",
    )


def write_settings(session: Session, settings: ClusterSettings, lease_seconds: float) -> None:
    validate_settings(settings.mode, settings.connection_timeout, lease_seconds)
    put_setting(session, MODE_KEY, settings.mode)
    put_setting(session, TIMEOUT_KEY, repr(settings.connection_timeout))
    put_setting(session, AUTO_SYNC_KEY, "true" if settings.auto_sync else "false")


def seed(session: Session, servers_file: Path, node_id: str, default: ClusterSettings) -> None:
    """First start of a cluster: take the servers list from the file, settings from env."""
    try:
        if not read_servers(session):
            if servers_file.is_file():
                entries = parse_servers_file(servers_file.read_text())
                log.info("seeding the servers list from %s", servers_file)
            else:
                entries = [ServerEntry(node_id)]
                log.info(
                    "no servers file at %s; the servers list is just %s", servers_file, node_id
                )
            write_servers(session, entries)
            bump_config_version(session)
        if read_setting(session, MODE_KEY) is None:
            put_setting(session, MODE_KEY, default.mode)
            put_setting(session, TIMEOUT_KEY, repr(default.connection_timeout))
        session.commit()
    except IntegrityError:  # another coordinator seeded at the same moment
        session.rollback()
