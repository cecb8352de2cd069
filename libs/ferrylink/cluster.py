"""Cluster rules as pure functions, and the assignment message every service follows.

Kept free of I/O so every row of the reference's failover rules is unit-tested:
- the primary is the first live server in list order, promoted only after the primary was
  unheard for the connection timeout (liveness is judged with that timeout);
- when the first listed server is live and synchronized again, it is primary again
  (fail-back) in `active_active` and `passive`;
- `passive_legacy` never promotes by itself: an operator fails over by hand.

What runs where follows the table in DESIGN.md ("What is active where").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

ClusterMode = Literal["active_active", "passive", "passive_legacy"]
CLUSTER_MODES: tuple[str, ...] = ("active_active", "passive", "passive_legacy")

# Work units, named once here. A service registers the ones it implements.
WORK_EVENTS = "transaction-manager.events"  # the shared event queue
WORK_EVENTS_LOCAL = "transaction-manager.events-local"  # a node's own queue (passive_legacy)
WORK_TRANSFER_LOG = "transaction-manager.transfer-log"  # serving the consolidated log
WORK_FOLDER_MONITOR = "folder-monitor.watch"
WORK_SCHEDULER = "scheduler.jobs"
WORK_SENTINEL_LINK = "sentinel-link.deliver"
WORK_DEAD_LETTERS = "transaction-manager.dead-letters"  # keeping parked events for the API

# Work that at most one server may run at a time; it self-fences when assignments stop.
PRIMARY_ONLY_WORK: frozenset[str] = frozenset(
    {WORK_TRANSFER_LOG, WORK_DEAD_LETTERS, WORK_FOLDER_MONITOR, WORK_SCHEDULER, WORK_SENTINEL_LINK}
)


def live_servers(
    servers: Sequence[str], last_heard: Mapping[str, float], now: float, timeout: float
) -> set[str]:
    """Servers heard within `timeout` seconds (a server is down after the connection timeout)."""
    return {s for s in servers if s in last_heard and now - last_heard[s] <= timeout}


@dataclass(frozen=True)
class PrimaryDecision:
    primary: str | None
    reason: str


def decide_primary(
    servers: Sequence[str],
    live: set[str],
    synchronized: set[str],
    mode: str,
    current: str | None,
    leading_for: float,
    connection_timeout: float,
) -> PrimaryDecision:
    """Who should be primary now.

    `live` are the servers heard within the connection timeout; `synchronized` those running
    the cluster's current configuration; `leading_for` is how long this coordinator has been
    the leader (before a full timeout has passed it cannot tell a slow starter from a dead
    server, so it only designates the first listed server).
    """
    if not servers:
        return PrimaryDecision(None, "the servers list is empty")
    first = servers[0]
    eligible = [s for s in servers if s in live and s in synchronized]

    if current is not None and current not in servers:
        current = None  # removed from the list: choose again
    if current is None:
        if first in eligible:
            return PrimaryDecision(first, f"{first} is the first listed server and is live")
        if leading_for < connection_timeout:
            return PrimaryDecision(None, f"waiting up to the connection timeout for {first}")
        if eligible:
            return PrimaryDecision(
                eligible[0], f"{eligible[0]} is the first live server in list order"
            )
        return PrimaryDecision(None, "no server is live")

    if mode == "passive_legacy":
        if current in live:
            return PrimaryDecision(current, f"{current} is live")
        return PrimaryDecision(
            current, f"{current} is down; passive_legacy waits for a manual failover"
        )

    if current in live:
        if current != first and first in eligible:
            return PrimaryDecision(first, f"fail-back: {first} is live and synchronized again")
        return PrimaryDecision(current, f"{current} is live")
    if eligible:
        return PrimaryDecision(
            eligible[0],
            f"{current} unheard for the connection timeout; {eligible[0]} is next in list order",
        )
    return PrimaryDecision(None, f"{current} is down and no other server is live")


def desired_work(
    mode: str, servers: Sequence[str], live: set[str], synchronized: set[str], primary: str | None
) -> dict[str, list[str]]:
    """Which work units each server should run (the table in DESIGN.md)."""
    work: dict[str, list[str]] = {server: [] for server in servers}
    for server in servers:
        ready = server in live and server in synchronized
        if mode == "active_active" and ready or mode == "passive" and server == primary:
            work[server].append(WORK_EVENTS)
        elif mode == "passive_legacy" and server in live:
            # Every TM listens on its own node-local queue; only the primary gets traffic.
            work[server].append(WORK_EVENTS_LOCAL)
        if server == primary:
            work[server].extend(sorted(PRIMARY_ONLY_WORK))
    return work


class Assignment(BaseModel):
    """The coordinator's whole desired state, published on every heartbeat period.

    A service acts on the newest epoch it has seen and stops its primary-only work when the
    assignment has expired (self-fencing); it starts primary-only work only from `not_before`,
    which the leader sets past every earlier assignment's expiry when the primary changes.
    """

    epoch: int = Field(ge=0)
    mode: str
    leader: str
    primary: str | None
    work: dict[str, list[str]]
    issued_at: float
    not_before: float
    expires_at: float

    def work_for(self, node_id: str, now: float) -> set[str]:
        """The work `node_id` may run at `now` under this assignment."""
        if now >= self.expires_at:
            # Expired: keep only work that is safe on any number of servers.
            return {w for w in self.work.get(node_id, []) if w not in PRIMARY_ONLY_WORK}
        units = set(self.work.get(node_id, []))
        if now < self.not_before:
            units -= PRIMARY_ONLY_WORK
        return units


class Heartbeat(BaseModel):
    """What every service broadcasts each heartbeat period: alive, and what it runs."""

    node: str
    service: str
    pid: int
    sent_at: float
    epoch: int | None = None
    active: list[str] = Field(default_factory=list)
    config_version: int = 0
