"""Claims, counters and attempts: the rows that keep two copies of one event apart.

Times come from the database's clock (every server judges a claim by the same clock), and
each operation is one statement, atomic on SQLite and PostgreSQL alike:
- a claim is taken by INSERT .. ON CONFLICT DO UPDATE .. WHERE expired-or-mine .. RETURNING:
  it returns a row only to the one caller that holds the claim afterwards;
- the claim is renewed in every transaction that records a step's plan, and that
  transaction fails (ClaimLost) if the claim passed to another owner meanwhile;
- `{counter}` is one INSERT .. ON CONFLICT DO UPDATE SET value = value + n RETURNING value,
  committed before the rename's plan (values are unique; one drawn by an event that then
  failed is not reused).

A batch of events (routing.py) takes, renews and drops the claims of all its events in one
statement each; RETURNING names the events whose claim is (still) ours.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session

from ferrylink.db import one_of_sql, one_of_value
from ferrylink.fencing import db_now


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
               seconds: float) -> set[str]:  # fmt: skip
    """Extend our claims in the caller's transaction; the ids still ours (a missing one
    passed to another owner: its work must not commit)."""
    dialect = connection.dialect.name
    statement = text(
        f"UPDATE event_claim SET expires_at = {db_now(dialect)} + :seconds "
        f"WHERE event_id {one_of_sql('ids', dialect)} AND owner = :owner RETURNING event_id"
    )
    ids = one_of_value(event_ids, dialect)
    result = connection.execute(statement, {"ids": ids, "owner": owner, "seconds": seconds})
    return {row[0] for row in result}


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
