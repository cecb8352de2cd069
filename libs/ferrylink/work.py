"""Following the coordinator: every service runs exactly the work its assignment gives it.

A service registers its work units (a queue consumer, or a loop with start/stop), and the
`WorkFollower` switches them on and off to match the newest assignment for this node:
- assignments with an older epoch than one already seen are ignored;
- primary-only work stops by itself once the assignment has expired (self-fencing), and
  starts no earlier than the assignment's `not_before`, both judged on the database's clock
  (as this process reads it, `DatabaseClock`) since the coordinator issues them on it;
- primary-only work asks `token()` for the grant it runs under and has each write checked
  against the database with it (fencing.py); when the database refuses an epoch, that
  epoch's primary-only work stops at once (`fenced`), until a newer assignment comes;
- every activation is recorded as an interval (unit, epoch, start, end) for `GET /work`,
  which is how tests prove that primary-only work never ran on two servers at once; a unit
  is active (and reported so in heartbeats) until its stop has returned, and the leader
  holds a new primary's primary-only work while another server reports any
  (`cluster.handover_waits_for`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from ferrylink.cluster import PRIMARY_ONLY_WORK, Assignment
from ferrylink.consumer_manager import ConsumerManager
from ferrylink.fencing import Fenced, FencingToken

log = logging.getLogger(__name__)


class LoopWork(Protocol):
    """Work that is not a queue consumer: started and stopped by the follower."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class FlagWork:
    """Work that is a permission, not a loop (e.g. serving the consolidated transfer log):
    the service checks `is_set` before doing it."""

    def __init__(self) -> None:
        self._on = threading.Event()

    @property
    def is_set(self) -> bool:
        return self._on.is_set()

    def start(self) -> None:
        self._on.set()

    def stop(self) -> None:
        self._on.clear()


@dataclass
class Activation:
    unit: str
    epoch: int
    start: float
    end: float | None = None
    stopping: float | None = None  # when the follower began to stop it

    def as_dict(self) -> dict[str, Any]:
        return {"unit": self.unit, "epoch": self.epoch, "start": self.start, "end": self.end,
                "stopping": self.stopping}  # fmt: skip


def wall_clock() -> tuple[float, float]:
    now = time.time()
    return now, now


@dataclass
class WorkFollower:
    node_id: str
    consumers: ConsumerManager
    loops: dict[str, LoopWork] = field(default_factory=dict)
    consumer_units: set[str] = field(default_factory=set)
    history_limit: int = 1000
    # (earliest, latest) the database's time can be now (DatabaseClock.bounds).
    clock: Callable[[], tuple[float, float]] = wall_clock
    # Told when this process saw a new epoch or started or stopped primary-only work: the
    # runtime sends a heartbeat at once, so a handover waits no heartbeat period for it.
    report_now: Callable[[], None] | None = None

    def __post_init__(self) -> None:
        # Two locks: `_lock` guards the state and is held only briefly, so heartbeats and
        # `/work` can always read it; `_switching` serializes starting and stopping work,
        # which may wait (a loop's stop() can wait for publish confirms).
        self._lock = threading.Lock()
        self._switching = threading.Lock()
        self._assignment: Assignment | None = None
        self._fenced_epoch: int | None = None  # the database refused this epoch
        self._active: dict[str, Activation] = {}
        self._history: list[Activation] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._tick_forever, name="work-follower", daemon=True
        )

    @property
    def units(self) -> set[str]:
        return set(self.loops) | self.consumer_units

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._reconcile(stopping=True)

    def offer(self, assignment: Assignment) -> bool:
        """Take an assignment unless it is older than the newest seen; apply it at once."""
        with self._lock:
            current = self._assignment
            if current is not None and assignment.epoch < current.epoch:
                log.info(
                    "ignoring assignment of old epoch %s (seen %s)", assignment.epoch, current.epoch
                )
                return False
            if (
                current is not None
                and assignment.epoch == current.epoch
                and assignment.issued_at < current.issued_at
            ):
                return False
            self._assignment = assignment
        self._reconcile()
        if current is None or assignment.epoch > current.epoch:
            self._report()
        return True

    @property
    def epoch(self) -> int | None:
        with self._lock:
            return self._assignment.epoch if self._assignment else None

    @property
    def mode(self) -> str | None:
        """The cluster mode of the newest assignment (None before the first one)."""
        with self._lock:
            return self._assignment.mode if self._assignment else None

    def token(self) -> FencingToken:
        """The grant this node's primary-only work runs under now: `Fenced` unless the
        newest assignment names this node primary, has surely begun and surely not run out,
        and the database has not refused its epoch."""
        earliest, latest = self.clock()
        with self._lock:
            assignment, fenced = self._assignment, self._fenced_epoch
        if assignment is None or assignment.primary != self.node_id:
            raise Fenced(f"{self.node_id} is not the primary")
        if assignment.epoch == fenced:
            raise Fenced(f"the database refused epoch {fenced}")
        if latest >= assignment.expires_at:
            raise Fenced(f"the grant of epoch {assignment.epoch} ran out")
        if earliest < assignment.not_before:
            raise Fenced(f"the grant of epoch {assignment.epoch} has not begun")
        return FencingToken(assignment.epoch, self.node_id)

    def fenced(self, token: FencingToken) -> None:
        """The database refused `token`: stop primary-only work now (on the follower's own
        thread; the caller may be that work) unless a newer assignment came meanwhile."""
        with self._lock:
            if self._assignment is not None and self._assignment.epoch == token.epoch:
                self._fenced_epoch = token.epoch
                log.warning("epoch %s was fenced off: stopping primary-only work", token.epoch)

    def active(self) -> list[str]:
        with self._lock:
            return sorted(self._active)

    def status(self) -> dict[str, Any]:
        with self._lock:
            assignment = self._assignment
            return {
                "node": self.node_id,
                "epoch": assignment.epoch if assignment else None,
                "primary": assignment.primary if assignment else None,
                "expires_at": assignment.expires_at if assignment else None,
                "fenced_epoch": self._fenced_epoch,
                "units": sorted(self.units),
                "active": sorted(self._active),
                "history": [a.as_dict() for a in self._history]
                + [a.as_dict() for a in self._active.values()],
            }

    def _tick_forever(self) -> None:
        # Re-evaluate often so that expiry (self-fencing) and not_before take effect on time.
        while not self._stop.wait(0.1):
            self._reconcile()

    def _reconcile(self, stopping: bool = False) -> None:
        """Start and stop work to match the assignment as of now."""
        with self._switching:
            earliest, latest = self.clock()
            # Once stopping, an assignment still arriving (re-sent every heartbeat) must not
            # start work again on the way out.
            stopping = stopping or self._stop.is_set()
            with self._lock:
                assignment = self._assignment
                if assignment is None and not stopping:
                    return
                wanted = (
                    set()
                    if stopping or assignment is None
                    else assignment.work_for(self.node_id, earliest, latest) & self.units
                )
                if assignment is not None and assignment.epoch == self._fenced_epoch:
                    wanted -= PRIMARY_ONLY_WORK
                epoch = assignment.epoch if assignment else 0
                to_stop = sorted(set(self._active) - wanted)
                to_start = sorted(wanted - set(self._active))
            for unit in to_stop:
                with self._lock:
                    self._active[unit].stopping = time.time()
                began = time.monotonic()
                self._switch(unit, False)
                with self._lock:
                    activation = self._active.pop(unit)
                    activation.end = time.time()
                    self._history.append(activation)
                    del self._history[: -self.history_limit]
                log.info("stopped %s (epoch %s) in %.2f s", unit, epoch, time.monotonic() - began)
            if set(to_stop) & PRIMARY_ONLY_WORK:
                self._report()
            for unit in to_start:
                self._switch(unit, True)
                with self._lock:
                    self._active[unit] = Activation(unit, epoch, time.time())
                log.info("started %s (epoch %s)", unit, epoch)
            if set(to_start) & PRIMARY_ONLY_WORK:
                self._report()

    def _report(self) -> None:
        if self.report_now is not None:
            try:
                self.report_now()
            except Exception:
                log.exception("could not report the work at once")

    def _switch(self, unit: str, on: bool) -> None:
        """A unit may be a consumer, a loop, or both (the sentinel link's consumer and its
        delivery loop): consumers start first and stop first."""
        if unit in self.consumer_units:
            self._switch_consumer(unit, on)
        if unit in self.loops:
            loop = self.loops[unit]
            try:
                (loop.start if on else loop.stop)()
            except Exception:
                log.exception("could not %s %s", "start" if on else "stop", unit)

    def _switch_consumer(self, unit: str, on: bool) -> None:
        with self._lock:
            active = {u for u in self._active if u in self.consumer_units}
        active = active | {unit} if on else active - {unit}
        self.consumers.set_active(active)


class PollingLoop:
    """Work that calls `poll(stop)` every `interval` seconds on its own thread while assigned.

    `stop()` sets the event `poll` receives (a long poll checks it between pieces of work) and
    returns once the current poll finished, so no poll runs after the service was told to
    stop (the self-fencing guarantee depends on it).
    """

    def __init__(
        self, name: str, poll: Callable[[threading.Event], object], interval: float
    ) -> None:
        self.name = name
        self.poll = poll
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(self._stop,), name=self.name, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self, stop: threading.Event) -> None:
        log.info("%s started", self.name)
        while not stop.is_set():
            try:
                self.poll(stop)
            except Exception:
                log.exception("%s: poll failed", self.name)
            stop.wait(self.interval)
        log.info("%s stopped", self.name)
