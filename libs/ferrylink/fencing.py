"""Fencing tokens: the database is the one clock and the one arbiter of who is primary.

A grant (the coordinator's assignment) says "st1 is primary under epoch 7 until T". Time
alone cannot enforce that: a process frozen past T (SIGSTOP, a VM pause, a long GC) wakes
up still believing it, and hosts' clocks drift. So:

- Every write that only the primary may do runs, in its own transaction and as its last
  statement before the commit, `Fence.check(session, token)`: the token is the epoch (and
  node) the work was started under, and the check passes only while `cluster_state` still
  names that epoch and this node. Otherwise it raises `Fenced` and the caller rolls back:
  "stop, I am not primary any more". The check also holds the epoch still until the commit
  (PostgreSQL: `FOR SHARE` on the row, so the leader's epoch change waits for the commit;
  SQLite: the write lock), so no write of an old epoch commits after a new epoch did.
- On PostgreSQL the same statement sets `idle_in_transaction_session_timeout` for the rest
  of the transaction: a process frozen between its check and its commit is disconnected by
  the server after `IDLE_TIMEOUT_SECONDS`, which ends its transaction (nothing commits) and
  releases the row, so a frozen writer cannot hold back the next epoch.
- Times of leases and grants are the database's (`db_now`); a process compares them with
  `DatabaseClock.bounds()`, its own reading of the database clock carried forward with its
  monotonic clock: the earliest and the latest the database's time can be now.

What a frozen process cannot be stopped from doing is what it does outside the database (a
publish, an HTTP POST, a file move already under way): those are made harmless by
idempotency (event ids, claims and plan-act-done in the transaction manager, record ids at
the tracking receivers), and the new primary starts only `not_before` the old grant ran out
plus a margin.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select, text, update
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from ferrylink.metrics import FENCED_WRITES
from ferrylink.tables.cluster import ClusterState

log = logging.getLogger(__name__)

# PostgreSQL: a fenced transaction left idle this long (its process frozen) is ended by the
# server. Below the leader's lease, so a frozen writer never costs the leader its lease.
IDLE_TIMEOUT_SECONDS = 2.0


class Fenced(Exception):
    """This process's grant is not the current one (another epoch began, or the grant ran
    out): roll back, do nothing more as primary."""


@dataclass(frozen=True)
class FencingToken:
    """The grant primary-only work runs under: this node, primary at this epoch."""

    epoch: int
    node: str


# -- the database clock ------------------------------------------------------------------------


def db_now(dialect: str) -> str:
    """SQL for the database clock in epoch seconds."""
    if dialect == "postgresql":
        return "extract(epoch from clock_timestamp())"
    return "((julianday('now') - 2440587.5) * 86400.0)"


def read_db_time(connection: Connection | Session) -> float:
    """The database's time now (epoch seconds)."""
    bind = connection.get_bind() if isinstance(connection, Session) else connection
    value = connection.execute(text(f"SELECT {db_now(bind.dialect.name)}")).scalar_one()
    return float(value)


@dataclass(frozen=True)
class ClockReading:
    """One reading of the database clock: `db_time` was read between the monotonic times
    `sent` and `received` of this process; the database's clock truncates to `resolution`
    (SQLite: a millisecond)."""

    sent: float
    received: float
    db_time: float
    resolution: float = 0.0

    @property
    def uncertainty(self) -> float:
        return self.received - self.sent


# Two clocks that tick at rates this far apart (NTP slews at most 500 ppm) drift apart by
# this fraction of the time since a reading.
MAX_DRIFT = 0.0005


def clock_bounds(reading: ClockReading, monotonic_now: float) -> tuple[float, float]:
    """(earliest, latest) the database's time can be at `monotonic_now`: the reading was
    taken at some moment between `sent` and `received`, and the clocks drift apart a little
    since then."""
    drift = max(monotonic_now - reading.sent, 0.0) * MAX_DRIFT
    earliest = reading.db_time + (monotonic_now - reading.received) - drift
    latest = reading.db_time + reading.resolution + (monotonic_now - reading.sent) + drift
    return earliest, latest


def better_reading(old: ClockReading | None, new: ClockReading, max_age: float) -> ClockReading:
    """Keep the tighter of two readings unless the old one is `max_age` seconds older."""
    if old is None or new.uncertainty <= old.uncertainty or new.sent - old.sent >= max_age:
        return new
    return old


class DatabaseClock:
    """The database's clock seen from this process: read every `interval` seconds on its own
    thread, carried forward with the monotonic clock in between. Before the first reading
    (the database unreachable at start) it falls back to this host's wall clock."""

    def __init__(self, engine: Engine, interval: float = 5.0, max_age: float = 60.0) -> None:
        self.engine = engine
        self.interval = interval
        self.max_age = max_age
        self._reading: ClockReading | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="db-clock", daemon=True)

    def read(self) -> ClockReading:
        with self.engine.connect() as connection:
            sent = time.monotonic()
            db_time = read_db_time(connection)
            received = time.monotonic()
        resolution = 1e-6 if self.engine.dialect.name == "postgresql" else 0.001
        reading = ClockReading(sent, received, db_time, resolution)
        with self._lock:
            self._reading = better_reading(self._reading, reading, self.max_age)
        return reading

    def bounds(self) -> tuple[float, float]:
        with self._lock:
            reading = self._reading
        if reading is None:
            now = time.time()
            return now, now
        return clock_bounds(reading, time.monotonic())

    def start(self) -> None:
        try:
            self.read()
        except SQLAlchemyError as exc:
            log.warning("cannot read the database clock yet (%s): using this host's clock", exc)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.read()
            except SQLAlchemyError as exc:
                log.info("cannot read the database clock: %s", exc)


# -- the fence ---------------------------------------------------------------------------------


_CLUSTER_STATE = ClusterState.__table__  # type: ignore[attr-defined]
_epoch, _primary = _CLUSTER_STATE.c["epoch"], _CLUSTER_STATE.c["primary"]
# Built once: the sentinel link checks before every batch's commit.
_HOLD_EPOCH_POSTGRESQL = (
    select(_epoch, _primary, func.set_config("idle_in_transaction_session_timeout",
                                             str(int(IDLE_TIMEOUT_SECONDS * 1000)), True))
    .where(_CLUSTER_STATE.c.id == 1)
    .with_for_update(read=True)
)  # fmt: skip
_HOLD_EPOCH_SQLITE = (
    update(_CLUSTER_STATE)
    .where(_CLUSTER_STATE.c.id == 1, _epoch == bindparam("epoch"), _primary == bindparam("node"))
    .values(epoch=_epoch)
)
_READ_EPOCH = select(_epoch, _primary).where(_CLUSTER_STATE.c.id == 1)


def check(session: Session | Connection, token: FencingToken) -> None:
    """Raise `Fenced` unless `cluster_state` names `token`'s epoch and node; otherwise hold
    the epoch still until the caller's transaction ends. Run it as the last statement before
    the commit (PostgreSQL holds the row until then)."""
    bind = session.get_bind() if isinstance(session, Session) else session
    if bind.dialect.name == "postgresql":
        row = session.execute(_HOLD_EPOCH_POSTGRESQL).first()
        if row is not None and (row[0], row[1]) == (token.epoch, token.node):
            return
    else:
        # SQLite: a write, so this transaction holds the database's write lock from here to
        # its commit and no epoch change can come in between.
        result = session.execute(_HOLD_EPOCH_SQLITE, {"epoch": token.epoch, "node": token.node})
        if result.rowcount == 1:  # type: ignore[attr-defined]
            return
    read_check(session, token)


def read_check(session: Session | Connection, token: FencingToken) -> None:
    """Raise `Fenced` unless `cluster_state` names `token`'s epoch and node, holding nothing:
    for a check apart from what it guards (a POST, another database's commit), which can
    prove only that the grant was current a moment before."""
    row = session.execute(_READ_EPOCH).first()
    if row is not None and (row[0], row[1]) == (token.epoch, token.node):
        return
    current = f"epoch {row[0]}, primary {row[1]}" if row is not None else "no cluster state"
    raise Fenced(f"{token.node} at epoch {token.epoch} is fenced off: the database has {current}")


class Fence:
    """What primary-only work holds: `token()` at the start of a piece of work (the grant it
    runs under, judged by this process), `check(session, token)` before each commit (judged
    by the database). `on_fenced` is told the epoch the database refused, so the process can
    stop its primary-only work at once instead of at its grant's expiry."""

    def __init__(
        self,
        token: Callable[[], FencingToken],
        on_fenced: Callable[[FencingToken], None] | None = None,
    ) -> None:
        self._token = token
        self._on_fenced = on_fenced

    def token(self) -> FencingToken:
        """The grant this process holds now; `Fenced` if it holds none (not primary, its
        assignment expired, or not started yet)."""
        try:
            return self._token()
        except Fenced:
            FENCED_WRITES.labels(judged_by="process").inc()
            raise

    def still(self, token: FencingToken) -> None:
        """`Fenced` unless `token` is still this process's grant."""
        if self.token() != token:
            FENCED_WRITES.labels(judged_by="process").inc()
            raise Fenced(f"the grant of epoch {token.epoch} was replaced")

    def confirm(self, engine: Engine, token: FencingToken) -> None:
        """Before a side effect outside the database (a publish, a POST): `Fenced` unless
        `token` is still this process's grant and the database's epoch. This narrows the
        window to the moment between the check and the act; what slips through is made
        harmless by idempotency (event ids, record ids), not by the fence."""
        self.still(token)
        self.check_apart(engine, token)

    def check(self, session: Session | Connection, token: FencingToken) -> None:
        """`check(session, token)`, telling `on_fenced` when the database refuses."""
        self._judged(check, session, token)

    def check_apart(self, engine: Engine, token: FencingToken) -> None:
        """The check on a connection of its own, for writes to another database (the
        sentinel link's node-local data in passive_legacy) and side effects outside any: it
        proves the grant was current a moment before, not at the commit. So it only reads:
        holding the epoch (on SQLite, the database's write lock) for a moment ending before
        the act would guard nothing, and the sentinel link checks before every POST, so it
        would stall the event path's writers each time."""
        with engine.connect() as connection:
            self._judged(read_check, connection, token)

    def _judged(
        self,
        judge: Callable[[Session | Connection, FencingToken], None],
        session: Session | Connection,
        token: FencingToken,
    ) -> None:
        try:
            judge(session, token)
        except Fenced as exc:
            FENCED_WRITES.labels(judged_by="database").inc()
            log.warning("%s", exc)
            if self._on_fenced is not None:
                self._on_fenced(token)
            raise


def _always(node: str) -> Callable[[], FencingToken]:
    def token() -> FencingToken:
        return FencingToken(-1, node)

    return token


class Unfenced(Fence):
    """No fencing at all: for tools and tests that run primary-only code without a
    coordinator (every check passes)."""

    def __init__(self, node: str = "") -> None:
        super().__init__(_always(node))

    def check(self, session: Session | Connection, token: FencingToken) -> None:
        return None

    def check_apart(self, engine: Engine, token: FencingToken) -> None:
        return None

    def confirm(self, engine: Engine, token: FencingToken) -> None:
        return None
