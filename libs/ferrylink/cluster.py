"""Cluster rules as pure functions (the messages they produce are in contracts.py).

Kept free of I/O so every row of the reference's failover rules is unit-tested:
- the primary is the first live server in list order, promoted only after the primary was
  unheard for the connection timeout (liveness is judged with that timeout);
- when the first listed server is live and synchronized again, it is primary again
  (fail-back) in `active_active` and `passive`;
- `passive_legacy` never promotes by itself: an operator fails over by hand;
- a grant to the primary never outlasts the leader's lease nor a lease past the last time
  the primary was heard; a new primary starts only after every earlier grant ran out plus
  a margin (times on the database's clock; see fencing.py);
- and, when the old primary is still heard (a fail-back, a manual failover), only once it
  reports that its primary-only work has stopped (`handover_waits_for`).

What runs where follows the table in DESIGN.md ("What is active where").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

from ferrylink.contracts import (
    CLUSTER_MODES,
    PRIMARY_ONLY_WORK,
    WORK_DEAD_LETTERS,
    WORK_DEAD_LETTERS_LOCAL,
    WORK_EVENTS,
    WORK_EVENTS_LOCAL,
    WORK_FOLDER_MONITOR,
    WORK_SCHEDULER,
    WORK_SENTINEL_LINK,
    WORK_TRANSFER_LOG,
    Assignment,
    ClusterMode,
    Heartbeat,
)

# Re-exported: the rules and the names they speak of are read together.
__all__ = [
    "CLUSTER_MODES", "PRIMARY_ONLY_WORK", "WORK_DEAD_LETTERS", "WORK_DEAD_LETTERS_LOCAL",
    "WORK_EVENTS", "WORK_EVENTS_LOCAL", "WORK_FOLDER_MONITOR", "WORK_SCHEDULER",
    "WORK_SENTINEL_LINK", "WORK_TRANSFER_LOG", "Assignment", "ClusterMode", "Heartbeat",
    "PrimaryDecision", "decide_primary", "desired_work", "grant_expiry", "handover_not_before",
    "ServiceReport", "handover_waits_for", "hold_primary_work", "live_servers",
]  # fmt: skip


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
    mode: str,
    servers: Sequence[str],
    live: set[str],
    synchronized: set[str],
    primary: str | None,
    paused: Set[str] = frozenset(),
    hold_primary_only: bool = False,
) -> dict[str, list[str]]:
    """Which work units each server should run (the table in DESIGN.md). A server consumes
    no events until it is synchronized (a server that starts or comes back waits for its
    sync, as the reference's transaction manager does), whatever the mode, nor while an
    operator paused its event consumption (`paused`; its other work goes on). The primary
    gets its primary-only work unless it is held (`hold_primary_work`)."""
    work: dict[str, list[str]] = {server: [] for server in servers}
    for server in servers:
        ready = server in live and server in synchronized and server not in paused
        if ready and (mode == "active_active" or mode == "passive" and server == primary):
            work[server].append(WORK_EVENTS)
        elif ready and mode == "passive_legacy":
            # Every TM listens on its own node-local queue; only the primary gets traffic.
            work[server].append(WORK_EVENTS_LOCAL)
        if server in live and mode == "passive_legacy":
            # Its own queue's dead letters are kept by it (listed with the shared ones).
            work[server].append(WORK_DEAD_LETTERS_LOCAL)
        if server == primary and not hold_primary_only:
            work[server].extend(sorted(PRIMARY_ONLY_WORK))
    return work


@dataclass(frozen=True)
class ServiceReport:
    """A service's last heartbeat, as the leader holds it."""

    age: float  # seconds since it was heard
    epoch: int | None  # the newest assignment's epoch it had seen
    active: Sequence[str]  # the work it ran (a unit counts until its stop returned)


def handover_waits_for(
    primary: str | None,
    previous_primary: str | None,
    epoch: int,
    reports: Mapping[str, Mapping[str, ServiceReport]],
    timeout: float,
) -> list[str]:
    """What a new primary's primary-only work waits for, as "server/service: ..." texts:
    - primary-only work another server reports running;
    - a service of the previous primary that has not reported `epoch` yet: its last report
      may predate work it started since (it was primary until this epoch).
    A service unheard for the connection `timeout` is left out: it is down, frozen or cut
    off, its grant (a lease past when it was last heard) has run out, and only the time rule
    (`handover_not_before`) can speak for it."""
    waits: list[str] = []
    for server, services in sorted(reports.items()):
        if server == primary:
            continue
        for service, report in sorted(services.items()):
            if report.age > timeout:
                continue
            running = sorted(unit for unit in report.active if unit in PRIMARY_ONLY_WORK)
            if running:
                waits.append(f"{server}/{service}: runs {', '.join(running)}")
            elif server == previous_primary and (report.epoch is None or report.epoch < epoch):
                waits.append(f"{server}/{service}: has not reported epoch {epoch} yet")
    return waits


def hold_primary_work(primary_changed: bool, held_before: bool, waiting: bool) -> bool:
    """Whether the primary's primary-only work waits (`desired_work(hold_primary_only=)`).

    A handover to a new primary waits for the old one while it is heard: its grant runs out
    by time, but stopping takes time too (a POST in flight, a CPU-starved process), and the
    margin after the grant is only a guess at how long. So a new primary's primary-only work
    is held while there is something to wait for (`handover_waits_for`), and stays held
    until there is none. A primary that runs already is never held back: what a woken-up
    old primary reports then is fenced by its grant and the database, and would only make
    the working one stop."""
    return (primary_changed or held_before) and waiting


def grant_expiry(
    lease_expiry: float, now: float, primary_heard_age: float | None, lease_seconds: float
) -> float:
    """Until when an assignment lets the primary run primary-only work: never past the
    leader's lease, and never more than a lease past the last time the primary was heard
    (`primary_heard_age` seconds ago; None: never heard, a lease ago at most). So the grant
    of a primary that went silent runs out before the connection timeout declares it down,
    and its successor can start at once. All times on the database's clock; the age is
    measured by the leader (a duration, so its own clock's offset does not matter)."""
    age = lease_seconds if primary_heard_age is None else max(primary_heard_age, 0.0)
    return min(lease_expiry, now - age + lease_seconds)


def handover_not_before(now: float, issued_until: float, margin: float) -> float:
    """When a new primary may start: once every grant issued before has run out
    (`issued_until`), plus `margin` for what the database clock reading of a process may be
    off by and for the time an old primary's work takes to stop after its grant ran out."""
    return max(now, issued_until + margin)
