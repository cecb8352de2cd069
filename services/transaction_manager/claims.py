"""Claims, counters and attempts: the rows that keep two copies of one event apart.

Times come from the database's clock (every server judges a claim by the same clock), and
each operation is one statement, atomic on SQLite and PostgreSQL alike:
- a claim is taken by INSERT .. ON CONFLICT DO UPDATE .. WHERE expired-or-mine .. RETURNING:
  it returns a row only to the one caller that holds the claim afterwards;
- the claim is renewed in every transaction that records a step's plan, and that
  transaction fails (ClaimLost) if the claim passed to another owner meanwhile; in between,
  the `ClaimKeeper` renews it while the event is handled, so it runs out only when its
  holder died, froze or was cut off, not during a long step (a large file's push);
- `{counter}` is one INSERT .. ON CONFLICT DO UPDATE SET value = value + n RETURNING value,
  committed before the rename's plan (values are unique; one drawn by an event that then
  failed is not reused).

A batch of events (routing.py) takes, renews and drops the claims of all its events in one
statement each; RETURNING names the events whose claim is (still) ours.
"""

from __future__ import annotations

import logging
import os
import threading
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from ferrylink.db import one_of_sql, one_of_value, writing
from ferrylink.fencing import db_now

log = logging.getLogger(__name__)


class ClaimLost(Exception):
    """Our claim expired and another copy of the event took it: stop, touch nothing more."""


def new_owner(node_id: str) -> str:
    """A fresh owner per handling: a claim is never inherited by a later attempt."""
    return f"{node_id}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def take(engine: Engine, event_id: str, owner: str, seconds: float) -> bool:
    """Claim `event_id` for `seconds`; False while another owner's claim is unexpired."""
    now = db_now(engine.dialect.name)
    statement = text(
        f"INSERT INTO event_claim (event_id, owner, expires_at, attempts, last_error) "
        f"VALUES (:event_id, :owner, {now} + :seconds, 0, '') "
        f"ON CONFLICT (event_id) DO UPDATE SET owner = excluded.owner, "
        f"expires_at = excluded.expires_at "
        f"WHERE event_claim.expires_at < {now} OR event_claim.owner = excluded.owner "
        f"RETURNING owner"
    )
    with engine.begin() as connection:
        row = connection.execute(
            statement, {"event_id": event_id, "owner": owner, "seconds": seconds}
        ).first()
    return row is not None


def take_many(engine: Engine, event_ids: Sequence[str], owner: str, seconds: float) -> set[str]:
    """Claim every event of `event_ids` (distinct) for `seconds` in one statement; the ids
    claimed (the others are held by another owner's unexpired claim)."""
    if not event_ids:
        return set()
    now = db_now(engine.dialect.name)
    rows = ", ".join(f"(:e{i}, :owner, {now} + :seconds, 0, '')" for i in range(len(event_ids)))
    statement = text(
        f"INSERT INTO event_claim (event_id, owner, expires_at, attempts, last_error) "
        f"VALUES {rows} "
        f"ON CONFLICT (event_id) DO UPDATE SET owner = excluded.owner, "
        f"expires_at = excluded.expires_at "
        f"WHERE event_claim.expires_at < {now} OR event_claim.owner = excluded.owner "
        f"RETURNING event_id"
    )
    params: dict[str, object] = {f"e{i}": event_id for i, event_id in enumerate(event_ids)}
    params.update(owner=owner, seconds=seconds)
    with engine.begin() as connection:
        return {row[0] for row in connection.execute(statement, params)}


def renew_many(connection: Connection, event_ids: Sequence[str], owner: str,
               seconds: float, *, unexpired_only: bool = False) -> set[str]:  # fmt: skip
    """Extend our claims in the caller's transaction; the ids still ours (a missing one
    passed to another owner: its work must not commit). `unexpired_only` (the keeper's
    renewal between steps): only claims that have not run out, so a released claim
    (expired on purpose, `RELEASED`) stays released, and one that ran out is left to the
    next step's renewal or to the next copy."""
    dialect = connection.dialect.name
    now = db_now(dialect)
    unexpired = f" AND expires_at > {now}" if unexpired_only else ""
    statement = text(
        f"UPDATE event_claim SET expires_at = {now} + :seconds "
        f"WHERE event_id {one_of_sql('ids', dialect)} AND owner = :owner{unexpired} "
        f"RETURNING event_id"
    )
    ids = one_of_value(event_ids, dialect)
    result = connection.execute(statement, {"ids": ids, "owner": owner, "seconds": seconds})
    return {row[0] for row in result}


class ClaimKeeper:
    """Renews the claims of the events this process is handling, every quarter of their
    lifetime, on a thread of its own (started with the first claim held). A step that takes
    longer than the lifetime (a push of a large file over a slow link) keeps its claim, so a
    second copy of its event (redelivered when a broker connection dropped) waits for it
    instead of doing the step again alongside; a holder that died, froze or was cut off from
    the database stops renewing, and its claims run out `seconds` later."""

    def __init__(self, engine: Engine, seconds: float) -> None:
        self.engine = engine
        self.seconds = seconds
        self._held: dict[str, set[str]] = {}  # owner -> event ids
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def holding(self, owner: str, event_ids: Iterable[str]) -> Iterator[None]:
        """Keep `owner`'s claims of `event_ids` alive while the block runs."""
        with self._lock:
            self._held.setdefault(owner, set()).update(event_ids)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="claim-keeper",
                                                daemon=True)  # fmt: skip
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(owner, None)

    def held(self) -> dict[str, set[str]]:
        with self._lock:
            return {owner: set(ids) for owner, ids in self._held.items()}

    def renew(self) -> int:
        """One round, in one transaction: extend every claim held; forget those that are not
        ours any more or were released. The number extended."""
        held = self.held()
        if not held:
            return 0
        kept: dict[str, set[str]] = {}
        with writing(self.engine), self.engine.begin() as connection:
            for owner, ids in held.items():
                if ids:
                    kept[owner] = renew_many(connection, sorted(ids), owner, self.seconds,
                                             unexpired_only=True)  # fmt: skip
        with self._lock:
            for owner, ids in held.items():
                if owner in self._held:
                    self._held[owner] -= ids - kept.get(owner, set())
        return sum(len(ids) for ids in kept.values())

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                self.renew()
            except Exception as exc:  # the database away: the next round tries again
                log.warning("cannot renew the claims of the events being handled: %s", exc)


def finish_many(connection: Connection, event_ids: Sequence[str], owner: str) -> set[str]:
    """Drop our claims in the transaction that completes the events; the ids that were
    still ours."""
    dialect = connection.dialect.name
    statement = text(
        f"DELETE FROM event_claim WHERE event_id {one_of_sql('ids', dialect)} "
        f"AND owner = :owner RETURNING event_id"
    )
    ids = one_of_value(event_ids, dialect)
    result = connection.execute(statement, {"ids": ids, "owner": owner})
    return {row[0] for row in result}


def renew(session: Session, event_id: str, owner: str, seconds: float) -> None:
    """Extend our claim in the caller's transaction; ClaimLost if it is no longer ours."""
    now = db_now(session.get_bind().dialect.name)
    result = session.connection().execute(
        text(
            f"UPDATE event_claim SET expires_at = {now} + :seconds "
            f"WHERE event_id = :event_id AND owner = :owner"
        ),
        {"event_id": event_id, "owner": owner, "seconds": seconds},
    )
    if result.rowcount != 1:
        raise ClaimLost(f"the claim of event {event_id} passed to another owner")


def finish(session: Session, event_id: str, owner: str) -> None:
    """Drop our claim in the transaction that completes the event (ClaimLost if another
    owner holds it now)."""
    result = session.connection().execute(
        text("DELETE FROM event_claim WHERE event_id = :event_id AND owner = :owner"),
        {"event_id": event_id, "owner": owner},
    )
    if result.rowcount != 1:
        raise ClaimLost(f"the claim of event {event_id} passed to another owner")


# A released claim expired a second before its release (on the database clock): the next
# copy takes it at once, and the purge (event_claim_purge) can tell how long no one held it.
RELEASED = "{now} - 1"


def drop(engine: Engine, event_id: str, owner: str) -> None:
    """Delete our claim of an event found completed already (a late copy): its
    `processed_event` row is what keeps it from running again, not the claim."""
    with engine.begin() as connection:
        connection.execute(
            text("DELETE FROM event_claim WHERE event_id = :event_id AND owner = :owner"),
            {"event_id": event_id, "owner": owner},
        )


def drop_many(engine: Engine, event_ids: Sequence[str], owner: str) -> None:
    """`drop` for many events (one statement)."""
    if not event_ids:
        return
    dialect = engine.dialect.name
    statement = text(
        f"DELETE FROM event_claim WHERE event_id {one_of_sql('ids', dialect)} AND owner = :owner"
    )
    with engine.begin() as connection:
        connection.execute(statement, {"ids": one_of_value(event_ids, dialect), "owner": owner})


def release(engine: Engine, event_id: str, owner: str) -> None:
    """Let the next copy in at once (after a failure or a retry of ours)."""
    released = RELEASED.format(now=db_now(engine.dialect.name))
    with engine.begin() as connection:
        connection.execute(
            text(f"UPDATE event_claim SET expires_at = {released} WHERE event_id = :event_id "
                 "AND owner = :owner"),
            {"event_id": event_id, "owner": owner},
        )  # fmt: skip


def count_failure(engine: Engine, event_id: str, owner: str, error: str) -> int:
    """Count one failure of the event's own and release the claim; the attempts so far."""
    released = RELEASED.format(now=db_now(engine.dialect.name))
    with engine.begin() as connection:
        row = connection.execute(
            text(
                "UPDATE event_claim SET attempts = attempts + 1, last_error = :error, "
                f"expires_at = {released} WHERE event_id = :event_id AND owner = :owner "
                "RETURNING attempts"
            ),
            {"event_id": event_id, "owner": owner, "error": error[:2000]},
        ).first()
    return int(row[0]) if row is not None else 0


def next_counter(connection: Connection, route_id: int) -> int:
    """The route's next `{counter}` value, in the caller's (write) transaction."""
    return next_counters(connection, route_id, 1)


def next_counters(connection: Connection, route_id: int, count: int) -> int:
    """Draw `count` consecutive `{counter}` values of the route in the caller's (write)
    transaction; returns the last (the values are last - count + 1 .. last)."""
    row = connection.execute(
        text(
            "INSERT INTO route_counter (route_id, value) VALUES (:route_id, :count) "
            "ON CONFLICT (route_id) DO UPDATE SET value = route_counter.value + :count "
            "RETURNING value"
        ),
        {"route_id": route_id, "count": count},
    ).one()
    return int(row[0])
