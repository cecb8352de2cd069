"""The coordinator loop: hear heartbeats, hold or seek the leadership lease, and - while
leading - decide the primary and publish the whole desired state (the assignment).

Every coordinator tracks heartbeats, so whichever takes over the lease already knows who is
alive. Only the lease holder writes the cluster state and publishes assignments, and only
right after a committed renewal; each assignment expires with that lease.

Two clocks, kept apart: heartbeat ages and "leading for" are durations on this process's
clock; the lease and every time in an assignment (issued, not before, expires) are on the
database's clock, read in the leader's transaction, which every process compares with
(fencing.py).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session

from ferrylink.cluster import (
    PRIMARY_ONLY_WORK,
    Assignment,
    Heartbeat,
    ServiceReport,
    decide_primary,
    desired_work,
    grant_expiry,
    handover_not_before,
    handover_waits_for,
    hold_primary_work,
    live_servers,
)
from ferrylink.config import read_config_version
from ferrylink.messaging import queue_message_counts
from ferrylink.metrics import PRIMARY_CHANGES, QUEUE_MESSAGES
from ferrylink.runtime import ServiceRuntime
from ferrylink.tables.cluster import ClusterState
from services.cluster_coordinator import leadership, store
from services.cluster_coordinator.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class HeartbeatTracker:
    """When each (server, service) was last heard, by this process's clock."""

    heard: dict[tuple[str, str], tuple[float, Heartbeat]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, heartbeat: Heartbeat, now: float) -> None:
        key = (heartbeat.node, heartbeat.service)
        with self.lock:
            _, last = self.heard.get(key, (0.0, None))
            # A process sends from two threads (its period, and at once when its work
            # changed): an older report arriving later must not undo a newer one.
            if last is not None and last.pid == heartbeat.pid and heartbeat.sent_at < last.sent_at:
                return
            self.heard[key] = (now, heartbeat)

    def snapshot(self) -> dict[tuple[str, str], tuple[float, Heartbeat]]:
        with self.lock:
            return dict(self.heard)


@dataclass
class ClusterView:
    """What `GET /cluster` shows and what the leader decides from."""

    mode: str
    connection_timeout: float
    auto_sync: bool
    config_version: int
    servers: list[store.ServerEntry]
    live: set[str]
    synchronized: set[str]
    services: dict[str, dict[str, Any]]
    # For each live server, when the least recently heard of its services was heard.
    heard_at: dict[str, float]
    # Servers whose event consumption an operator paused.
    paused: set[str] = field(default_factory=set)

    def handover_waits_for(
        self, primary: str | None, previous_primary: str | None, epoch: int
    ) -> list[str]:
        """What a new primary's primary-only work waits for (`cluster.handover_waits_for`)."""
        reports = {
            server: {
                name: ServiceReport(service["age"], service["epoch"], service["active"])
                for name, service in found.items()
            }
            for server, found in self.services.items()
        }
        return handover_waits_for(
            primary, previous_primary, epoch, reports, self.connection_timeout
        )


class Coordinator:
    def __init__(self, runtime: ServiceRuntime, settings: Settings) -> None:
        self.runtime = runtime
        self.settings = settings
        self.node_id = settings.node_id
        self.tracker = HeartbeatTracker()
        self.defaults = store.ClusterSettings(settings.cluster_mode, settings.connection_timeout)
        self.leading_since: float | None = None
        self.term: int | None = None
        self.last_decision_reason = ""
        self.last_assignment: Assignment | None = None
        self._last_published = 0.0
        # When each server was first seen running an older configuration version.
        self._behind_since: dict[str, float] = {}
        # When the leader last asked each server to sync by itself (auto sync).
        self._sync_requested_at: dict[str, float] = {}
        self._started_at = time.time()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="coordinator", daemon=True)
        self._sampler = threading.Thread(
            target=self._sample_queues_forever, name="queue-sampler", daemon=True
        )

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        with Session(self.runtime.engine) as session:
            store.seed(session, self.settings.servers_file, self.node_id, self.defaults)
            leadership.ensure_lease_row(session)
        self._started_at = time.time()
        self._thread.start()
        self._sampler.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._sampler.join(5)

    def _sample_queues_forever(self) -> None:
        """The leader samples the shared work queues' depths for /metrics (one short broker
        connection every few heartbeats; in its own thread, so a slow broker never delays
        an assignment)."""
        topology = self.runtime.topology
        events = topology.queue("events")
        queues = {
            "events": events,
            "events.dead": topology.dead_letter_queue(events),
            "transfer-states": topology.queue("transfer-states"),
        }
        while not self._stop.wait(5 * self.settings.heartbeat_interval):
            if not self.is_leader():
                continue
            try:
                counts = queue_message_counts(self.settings.amqp_urls, list(queues.values()))
            except Exception as exc:
                log.info("cannot sample the queue depths: %s", exc)
                continue
            for label, name in queues.items():
                QUEUE_MESSAGES.labels(queue=label).set(counts[name])

    def on_heartbeat(self, heartbeat: Heartbeat) -> None:
        self.tracker.record(heartbeat, time.time())

    # -- the view -------------------------------------------------------------------------------

    def view(self, session: Session, now: float) -> ClusterView:
        settings = store.read_settings(session, self.defaults)
        servers = store.read_servers(session)
        config_version = read_config_version(self.runtime.engine)
        required = self.settings.required_service_names
        heard = self.tracker.snapshot()
        services: dict[str, dict[str, Any]] = {s.id: {} for s in servers}
        live: set[str] = set()
        synchronized: set[str] = set()
        heard_at: dict[str, float] = {}
        for server in servers:
            last_heard: dict[str, float] = {}
            versions: set[int] = set()
            for (node, service), (at, heartbeat) in heard.items():
                if node != server.id:
                    continue
                last_heard[service] = at
                # Only services heard within the timeout: a dead one's last (old) version
                # would otherwise leave its server unsynchronized for good.
                if now - at <= settings.connection_timeout:
                    versions.add(heartbeat.config_version)
                services[server.id][service] = {
                    "age": round(now - at, 3),
                    "pid": heartbeat.pid,
                    "epoch": heartbeat.epoch,
                    "active": heartbeat.active,
                    "config_version": heartbeat.config_version,
                    "api_url": heartbeat.api_url,
                }
            fresh = live_servers(sorted(last_heard), last_heard, now, settings.connection_timeout)
            if required <= fresh:
                live.add(server.id)
                heard_at[server.id] = min(last_heard[service] for service in required)
                # Every service of it runs the current configuration.
                if self._synchronized(server.id, versions, config_version, now):
                    synchronized.add(server.id)
        return ClusterView(
            mode=settings.mode,
            connection_timeout=settings.connection_timeout,
            auto_sync=settings.auto_sync,
            config_version=config_version,
            servers=servers,
            live=live,
            synchronized=synchronized,
            paused=store.read_paused(session),
            services=services,
            heard_at=heard_at,
        )

    def _synchronized(self, server: str, versions: set[int], current: int, now: float) -> bool:
        """A server is synchronized when every service of it runs the current configuration.
        A service that never synced (version 0: it started or came back) makes it out of sync
        at once; one that runs an older version does so after a few heartbeat periods: every
        change is announced and applied at once, and without this grace each change would
        briefly take the work off every server (cancelling its consumers)."""
        if versions == {current}:
            self._behind_since.pop(server, None)
            return True
        if 0 in versions:
            return False
        since = self._behind_since.setdefault(server, now)
        return now - since < 3 * self.settings.heartbeat_interval

    # -- leader loop ----------------------------------------------------------------------------

    def _run(self) -> None:
        # Tick faster than the heartbeat so a promotion follows the timeout closely; the
        # assignment is re-published every heartbeat period even when nothing changed.
        tick = min(0.25, self.settings.heartbeat_interval)
        while not self._stop.wait(tick):
            try:
                assignment = self.step(time.time())
            except Exception:
                log.exception("coordinator step failed; not issuing assignments")
                self._lose_leadership()
                continue
            if assignment is not None:
                self._publish(assignment)

    def _lose_leadership(self) -> None:
        if self.leading_since is not None:
            log.warning("%s is no longer the coordinator leader", self.node_id)
        self.leading_since = None
        self.term = None

    def can_lead(self, now: float) -> bool:
        """Leading is only useful while this coordinator is connected to the broker and hears
        itself there: a coordinator cut off from the broker (but not from the database) must
        let its lease lapse, or the cluster would have a leader nobody hears."""
        if not (self.runtime.publisher.connected and self.runtime.consumers.connected):
            return False
        own = self.tracker.snapshot().get((self.node_id, self.runtime.service_name))
        return own is not None and now - own[0] <= self.settings.lease_seconds

    def step(self, now: float) -> Assignment | None:
        """One round: renew/acquire the lease; if leading, decide and return the assignment.
        `now` is this process's time (for heartbeat ages); the lease and the assignment's
        times are the database's."""
        if not self.can_lead(now):
            if self.leading_since is not None:
                log.warning("%s cannot reach the broker: letting the leadership lease lapse",
                            self.node_id)  # fmt: skip
            self._lose_leadership()
            return None
        with Session(self.runtime.engine) as session:
            db_now = leadership.begin_step(session, self.settings.lease_seconds)
            lease = leadership.acquire_or_renew(
                session, self.node_id, db_now, self.settings.lease_seconds
            )
            if lease is None:
                session.rollback()
                self._lose_leadership()
                return None
            new_term = lease.term != self.term
            if new_term:
                log.info("%s leads the coordinators (term %s)", self.node_id, lease.term)
                self.leading_since = now
                self.term = lease.term
            assert self.leading_since is not None
            state = session.get(ClusterState, 1, populate_existing=True) or ClusterState(id=1)
            view = self.view(session, now)
            servers = [s.id for s in view.servers]
            current = state.primary
            request = store.read_setting(session, store.FAILOVER_REQUEST_KEY)
            decision_primary: str | None
            if request and view.mode == "passive_legacy":
                log.warning("manual failover from %s to %s", current, request)
                decision_primary, reason = request, f"manual failover to {request}"
                store.put_setting(session, store.FAILOVER_REQUEST_KEY, "")
            else:
                decision = decide_primary(
                    servers,
                    view.live,
                    view.synchronized,
                    view.mode,
                    current,
                    now - max(self.leading_since, self._started_at),
                    view.connection_timeout,
                )
                decision_primary, reason = decision.primary, decision.reason
            primary_changed = decision_primary != current
            if new_term or primary_changed:
                state.epoch += 1
            # The last assignment committed, also by another leader before this one took
            # over: a handover under way goes on under the new term.
            previous = stored_assignment(state)
            if primary_changed:
                log.warning("primary %s -> %s: %s", current, decision_primary, reason)
                PRIMARY_CHANGES.inc()
                state.primary = decision_primary
                # Fence: the new primary starts only after every earlier grant expired, and
                # a margin later (see fencing.py and README "Fencing").
                state_not_before = handover_not_before(
                    db_now, state.issued_until, self.settings.fence_margin_seconds
                )
            else:
                state_not_before = (
                    previous.not_before
                    if previous is not None and previous.primary == state.primary
                    else db_now
                )
            # The handover's old primary (kept in the database: a new leader goes on
            # waiting for it), and what the new one's primary-only work waits for.
            stored_from = store.read_setting(session, store.HANDOVER_FROM_KEY) or ""
            handover_from = stored_from or None
            if primary_changed:
                handover_from = current
            waits = view.handover_waits_for(state.primary, handover_from, state.epoch)
            held_before = (
                previous is not None
                and previous.primary == state.primary
                and primary_work_held(previous)
            )
            hold = hold_primary_work(primary_changed, held_before, bool(waits))
            if hold:
                reason += f"; its primary-only work waits for: {waits}"
                if not held_before:
                    log.warning("primary-only work of %s waits for: %s", state.primary, waits)
            elif held_before:
                log.info("primary-only work of %s may start: nothing to wait for", state.primary)
            kept_from = (handover_from or "") if hold else ""
            if kept_from != stored_from:
                store.put_setting(session, store.HANDOVER_FROM_KEY, kept_from)
            assignment = Assignment(
                epoch=state.epoch,
                mode=view.mode,
                leader=self.node_id,
                primary=state.primary,
                work=desired_work(
                    view.mode,
                    servers,
                    view.live,
                    view.synchronized,
                    state.primary,
                    view.paused,
                    hold_primary_only=hold,
                ),
                issued_at=db_now,
                not_before=state_not_before,
                expires_at=self._grant_expiry(view, state.primary, lease.expires_at, now, db_now),
            )
            if state.primary is not None:
                # Only a grant to a primary must run out before another primary starts.
                state.issued_until = max(state.issued_until, assignment.expires_at)
            state.assignment_json = assignment.model_dump_json()
            session.add(state)
            session.commit()  # the renewal and the decision count from here on
        self.last_decision_reason = reason
        if view.auto_sync:
            self._sync_servers_behind(view, now)
        changed = self.last_assignment is None or self._differs(self.last_assignment, assignment)
        self.last_assignment = assignment
        if changed or now - self._last_published >= self.settings.heartbeat_interval:
            self._last_published = now
            return assignment
        return None

    def _sync_servers_behind(self, view: ClusterView, now: float) -> None:
        """Auto sync: a live server out of sync (it started, came back or missed a change)
        is told to reload the whole configuration, at most once every few heartbeats."""
        behind = [
            s.id
            for s in view.servers
            if s.id in view.live
            and s.id not in view.synchronized
            and now - self._sync_requested_at.get(s.id, 0.0) >= 3 * self.settings.heartbeat_interval
        ]
        if behind:
            log.info("auto sync of %s to configuration version %s", behind, view.config_version)
            for server in behind:
                self._sync_requested_at[server] = now
            self.runtime.request_sync(behind)

    def sync(self, timeout: float) -> tuple[int, bool]:
        """Manual sync: every server reloads the whole configuration; waits (up to
        `timeout`) until every live server reports the current version. Returns the version
        and whether every live server reached it."""
        version = self.runtime.request_sync()
        deadline = time.monotonic() + timeout
        while True:
            with Session(self.runtime.engine) as session:
                view = self.view(session, time.time())
            if all(
                service["config_version"] == version
                for server in view.live
                for service in view.services[server].values()
            ):
                return version, True
            if time.monotonic() >= deadline:
                return version, False
            time.sleep(0.1)

    def _grant_expiry(
        self,
        view: ClusterView,
        primary: str | None,
        lease_expiry: float,
        now: float,
        db_now: float,
    ) -> float:
        """How long this assignment lets the primary run primary-only work (the rule is
        `cluster.grant_expiry`): the primary's silence is measured on this process's clock,
        the expiry set on the database's."""
        if primary is None:
            return lease_expiry
        heard = view.heard_at.get(primary)
        age = None if heard is None else now - heard
        return grant_expiry(lease_expiry, db_now, age, self.settings.lease_seconds)

    @staticmethod
    def _differs(old: Assignment, new: Assignment) -> bool:
        return (old.epoch, old.primary, old.work, old.not_before) != (
            new.epoch,
            new.primary,
            new.work,
            new.not_before,
        )

    def _publish(self, assignment: Assignment) -> None:
        self.runtime.publish(assignment)
        # This server's own services follow it too, but the coordinator need not wait.
        self.runtime.follower.offer(assignment)

    def is_leader(self) -> bool:
        return self.leading_since is not None


def primary_work_held(assignment: Assignment) -> bool:
    """The assignment names a primary but holds its primary-only work back (a handover
    waiting for the old primary to stop)."""
    if assignment.primary is None:
        return False
    return not set(assignment.work.get(assignment.primary, [])) & PRIMARY_ONLY_WORK


def stored_assignment(state: ClusterState) -> Assignment | None:
    """The assignment the last leader committed (None if none, or unreadable)."""
    if not state.assignment_json:
        return None
    try:
        return Assignment.model_validate_json(state.assignment_json)
    except ValueError:
        log.warning("the stored assignment cannot be read; deciding without it")
        return None
