"""Link data: each transfer state becomes a record with a sequence number per cycle, appended
to one record log (`pos`) in one transaction (the broker message is acked after it commits).
Each endpoint has a position in that log (`SentinelDelivery.through_pos`); its backlog is the
records after it. So linking writes nothing per endpoint, and a delivered batch moves the
endpoint's position once.

Positions follow link order and commit in that order: a linking transaction appends after the
highest position it reads; linkers take turns (a PostgreSQL advisory lock, this process's
SQLite write turn), and should two still meet (two processes on one SQLite file around a
failover), the unique index fails one and it links again after the other. A reader that
saw position n never later finds a new record below n, and the records after every
endpoint's position are contiguous (the purge removes only records that all endpoints are
past), so a backlog is a subtraction.

Backlog bounds: an endpoint keeps at most `max_backlog` records, none older than
`max_age_seconds`; past either bound its position skips the OLDEST records, counted in its
`dropped` (shown by `GET /endpoints`). A new endpoint starts at the end of the log when it is
first seen (no backfill).

Linking, bounding and recording deliveries are primary-only writes: each commits only while
the database's epoch is the grant this process holds (ferrylink.fencing), so a sentinel link
frozen past its grant changes no link data when it wakes up. With node-local link data
(passive_legacy) the check runs against the shared database just before the local commit.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import Integer, Table, bindparam, func, insert, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from ferrylink.contracts import TransferState
from ferrylink.db import one_of_param, one_of_value, writing
from ferrylink.fencing import Fence, FencingToken, Unfenced
from ferrylink.tables.sentinel import (
    SentinelCycle,
    SentinelDelivery,
    SentinelEndpoint,
    SentinelLeg,
    SentinelRecord,
)

log = logging.getLogger(__name__)

RECORD_TYPE = "transfer_state"
# A batch of states that meets another instance's commits is read again and linked up to
# this many times in all (an overlap around a failover is brief).
LINK_ATTEMPTS = 5
# Any constant: the PostgreSQL advisory lock that makes linking transactions take turns.
LINK_LOCK_ID = 0x466C6B01
# The age bound is enforced at least this often while records are linked or delivered.
BOUNDS_PERIOD_SECONDS = 1.0

CYCLES: Table = SentinelCycle.__table__  # type: ignore[attr-defined]
LEGS: Table = SentinelLeg.__table__  # type: ignore[attr-defined]
RECORDS: Table = SentinelRecord.__table__  # type: ignore[attr-defined]
DELIVERY: Table = SentinelDelivery.__table__  # type: ignore[attr-defined]
HEARTBEAT_TYPE = "heartbeat"

# Statements run for every batch, built once (building one costs more than running it).
HEAD = select(
    func.coalesce(select(func.max(RECORDS.c.pos)).scalar_subquery(), 0),
    func.coalesce(select(func.max(DELIVERY.c.through_pos)).scalar_subquery(), 0),
)
POSITION = select(DELIVERY.c.through_pos).where(DELIVERY.c.endpoint_id == bindparam("endpoint"))
RECORDS_BETWEEN = select(func.count()).where(
    RECORDS.c.pos > bindparam("after"), RECORDS.c.pos <= bindparam("through")
)
NEXT_BATCH = (
    select(RECORDS.c.pos, RECORDS.c.body_json)
    .where(RECORDS.c.pos > POSITION.scalar_subquery(), RECORDS.c.pos > bindparam("after"))
    .order_by(RECORDS.c.pos)
    .limit(bindparam("limit", type_=Integer))
)


# -- pure rules --------------------------------------------------------------------------------


def becomes_current(revision: int, current: int | None) -> bool:
    """Whether a newly linked state (its `revision`) becomes its leg's current state, given
    the revision of the leg's current state (None: none yet). Not when it arrives after a
    later state of its leg (published again after a nack, or by another server's outbox
    relay): it is still linked, marked superseded. Revision 0 (sent before revisions
    existed) cannot be placed and, as before, always does."""
    return current is None or revision == 0 or revision >= current


def record_for(state: TransferState, seq: int, superseded: bool = False) -> dict[str, Any]:
    """What a receiver gets for one state; `id` is its idempotency key. `superseded`: a
    later state of the leg (higher `revision`) was sent before this one, so it does not
    change what the leg is now."""
    return {
        "type": RECORD_TYPE,
        "id": state.id,
        "cycle_id": state.cycle_id,
        "seq": seq,
        "leg": state.leg,
        "leg_key": state.leg_key,
        "status": state.state,
        "revision": state.revision,
        "superseded": superseded,
        "at": state.at.isoformat(),
        "event_id": state.event_id,
        "account": state.account,
        "file_name": state.file_name,
        "bytes": state.bytes,
        "direction": state.direction,
        "protocol": state.protocol,
        "partner": state.partner,
        "node": state.node,
        "detail": state.detail,
    }


def heartbeat_record(node: str, now: float) -> dict[str, Any]:
    """Tells a tracking system "the link is up" when no transfer happens."""
    return {"type": HEARTBEAT_TYPE, "id": f"heartbeat:{node}:{now:.3f}", "node": node, "at": now}


def retry_delay(
    failures: int, initial: float, maximum: float, rng: random.Random | None = None
) -> float:
    """Exponential backoff with full jitter in its upper half: after the n-th consecutive
    failure wait between half and all of min(maximum, initial * 2**(n-1))."""
    if failures <= 0:
        return 0.0
    ceiling = min(maximum, initial * 2 ** min(failures - 1, 62))
    return ceiling * (rng or random).uniform(0.5, 1.0)


# -- the store ---------------------------------------------------------------------------------


class LinkStore:
    """`config` holds the endpoints (shared database); `link` holds the link data (the same
    database, or a node-local SQLite file in passive_legacy)."""

    def __init__(self, config: Engine, link: Engine, fence: Fence | None = None) -> None:
        self.config = config
        self.link = link
        self.fence = fence or Unfenced()
        # Per endpoint: how many records its backlog can still take before its bound (a low
        # estimate: deliveries only add room), and when its bounds were last enforced. The
        # bounds are not checked against the database for every batch.
        self._room: dict[int, int] = {}
        self._enforced_at: dict[int, float] = {}
        # Endpoints known to have their position row (created when first seen).
        self._placed: set[int] = set()
        # What a batch looks up, each a list bound as one parameter (`ids`).
        dialect = link.dialect.name
        self._dialect = dialect
        self._linked = select(RECORDS.c.id).where(one_of_param(RECORDS.c.id, "ids", dialect))
        self._cycles = (
            select(CYCLES.c.cycle_id, CYCLES.c.next_seq)
            .where(one_of_param(CYCLES.c.cycle_id, "ids", dialect))
            .with_for_update()
        )
        self._legs = select(LEGS.c.leg_key, LEGS.c.revision).where(
            one_of_param(LEGS.c.leg_key, "ids", dialect)
        )

    def _commit_fenced(self, session: Session, token: FencingToken) -> None:
        """Check the grant (in this transaction when the link data is in the shared
        database), then commit; `Fenced` leaves the transaction to be rolled back."""
        session.flush()
        if self.link is self.config:
            self.fence.check(session, token)
        else:
            self.fence.check_apart(self.config, token)
        session.commit()

    def _values(self, values: Collection[str]) -> Any:
        return one_of_value(tuple(values), self._dialect)

    def endpoints(self) -> list[SentinelEndpoint]:
        with Session(self.config) as session:
            return list(session.exec(select(SentinelEndpoint).order_by(col(SentinelEndpoint.id))))

    def link_state(self, state: TransferState, endpoints: Sequence[SentinelEndpoint]) -> int | None:
        """Record `state` once, for every endpoint; its seq, or None if it was linked before
        (a redelivered message)."""
        return self.link_states([state], endpoints)[0]

    def link_states(
        self, states: Sequence[TransferState], endpoints: Sequence[SentinelEndpoint]
    ) -> list[int | None]:
        """Record each state once, in order and in one transaction (a state's seq follows the
        states of its cycle before it, here or earlier); every endpoint in `endpoints` gets
        them. Per state its seq, or None if it was linked before (a redelivered message, or
        a repeat in `states`)."""
        for _attempt in range(LINK_ATTEMPTS - 1):
            try:
                return self._link_states(states, endpoints)
            except IntegrityError:
                # Linked by another instance meanwhile (an overlap around a failover): read
                # again; what it linked is a repeat, and this batch goes after its records.
                continue
        return self._link_states(states, endpoints)

    def _link_states(
        self, states: Sequence[TransferState], endpoints: Sequence[SentinelEndpoint]
    ) -> list[int | None]:
        token = self.fence.token()
        now = time.time()
        seqs: list[int | None] = [None] * len(states)
        ids = [state.id for state in states]
        # Linkers take turns (this process's threads on SQLite, every instance on PostgreSQL),
        # so positions are not fought over; another process on SQLite may still clash on
        # one, and that batch is linked again after its records.
        with writing(self.link), Session(self.link) as session:
            read = session.connection().execute  # Core: no ORM work per statement
            if self._dialect == "postgresql":
                read(text("SELECT pg_advisory_xact_lock(:id)"), {"id": LINK_LOCK_ID})
            linked = set(read(self._linked, {"ids": self._values(ids)}).scalars().all())
            cycle_ids = {state.cycle_id for state in states}
            found = read(self._cycles, {"ids": self._values(cycle_ids)}).all()
            next_seq: dict[str, int] = {cycle_id: n for cycle_id, n in found}
            known_cycles = set(next_seq)
            leg_keys = {state.leg_key for state in states}
            # Each known leg's current revision (this batch's states update it as they go).
            revisions: dict[str, int] = {
                key: revision for key, revision in read(self._legs, {"ids": self._values(leg_keys)})
            }
            known_legs = set(revisions)
            head = _head(session)
            legs: dict[str, dict[str, Any]] = {}
            records: list[dict[str, Any]] = []
            for i, (state, state_id) in enumerate(zip(states, ids, strict=True)):
                if state_id in linked:
                    continue
                linked.add(state_id)
                seq = next_seq.get(state.cycle_id, 1)
                next_seq[state.cycle_id] = seq + 1
                seqs[i] = seq
                current = becomes_current(state.revision, revisions.get(state.leg_key))
                if current:
                    revisions[state.leg_key] = state.revision
                    legs[state.leg_key] = {"leg_key": state.leg_key, "cycle_id": state.cycle_id,
                                           "status": state.state.value, "seq": seq,
                                           "revision": state.revision,
                                           "updated_at": now}  # fmt: skip
                body = record_for(state, seq, superseded=not current)
                records.append({"id": state_id, "pos": head + len(records) + 1,
                                "cycle_id": state.cycle_id, "seq": seq,
                                "body_json": json.dumps(body), "linked_at": now})  # fmt: skip
            if not records:
                return seqs
            write = session.connection().execute  # executemany, Core
            # An endpoint seen for the first time starts here: these records are its first.
            new_endpoints = [
                e.id for e in endpoints if e.id is not None and e.id not in self._placed
            ]
            for endpoint_id in new_endpoints:
                _place(session, endpoint_id)
            cycle_rows = [{"k_cycle": c, "next_seq": n, "updated_at": now}
                          for c, n in next_seq.items() if c in known_cycles]  # fmt: skip
            new_cycles = [{"cycle_id": c, "next_seq": n, "updated_at": now}
                          for c, n in next_seq.items() if c not in known_cycles]  # fmt: skip
            leg_rows = [{**{k: v for k, v in row.items() if k != "leg_key"}, "k_leg": key}
                        for key, row in legs.items() if key in known_legs]  # fmt: skip
            new_legs = [row for key, row in legs.items() if key not in known_legs]
            if cycle_rows:
                # The SET columns are the parameters' other keys.
                write(update(CYCLES).where(CYCLES.c.cycle_id == bindparam("k_cycle")), cycle_rows)
            if new_cycles:
                write(insert(CYCLES), new_cycles)
            if leg_rows:
                write(update(LEGS).where(LEGS.c.leg_key == bindparam("k_leg")), leg_rows)
            if new_legs:
                write(insert(LEGS), new_legs)
            write(insert(RECORDS), records)
            try:
                self._commit_fenced(session, token)
            except IntegrityError:
                session.rollback()
                raise
        self._placed.update(new_endpoints)
        for endpoint in endpoints:
            self.keep_bounds(endpoint, now, added=len(records))
        return seqs

    def keep_bounds(self, endpoint: SentinelEndpoint, now: float, added: int = 0) -> int:
        """`enforce_bounds` once `added` more records may have filled the endpoint's room, or
        a second after it last ran (the age bound); how many were dropped."""
        assert endpoint.id is not None
        room = self._room.get(endpoint.id)
        recent = now - self._enforced_at.get(endpoint.id, 0.0) < BOUNDS_PERIOD_SECONDS
        if room is not None and added <= room and recent:
            self._room[endpoint.id] = room - added
            return 0
        return self.enforce_bounds(endpoint, now)

    def enforce_bounds(self, endpoint: SentinelEndpoint, now: float) -> int:
        """Move the endpoint's position past the oldest records beyond its bounds (the newest
        `max_backlog` stay, none older than `max_age_seconds`); count them. How many."""
        assert endpoint.id is not None
        token = self.fence.token()
        dropped = 0
        with writing(self.link), Session(self.link) as session:
            through = _position(session, endpoint.id)
            head = _head(session)
            if through is not None:
                skip_to = head - endpoint.max_backlog
                cutoff = now - endpoint.max_age_seconds
                oldest = session.execute(
                    select(RECORDS.c.linked_at)
                    .where(RECORDS.c.pos > through)
                    .order_by(RECORDS.c.pos)
                    .limit(1)
                ).scalar()
                if oldest is not None and oldest < cutoff:
                    aged = session.execute(
                        select(func.max(RECORDS.c.pos)).where(
                            RECORDS.c.pos > through, RECORDS.c.linked_at < cutoff
                        )
                    ).scalar()
                    skip_to = max(skip_to, int(aged or 0))
                if skip_to > through:
                    dropped = _records_between(session, through, skip_to)
                    _update_status(session, endpoint.id, placed=True, through_pos=skip_to,
                                   dropped=SentinelDelivery.dropped + dropped)  # fmt: skip
                    self._commit_fenced(session, token)
                    through = skip_to
            backlog = head - through if through is not None else 0
        self._room[endpoint.id] = max(0, endpoint.max_backlog - backlog)
        self._enforced_at[endpoint.id] = now
        if not dropped:
            return 0
        log.warning("endpoint %s: backlog over its bound, dropped %d oldest", endpoint.name,
                    dropped)  # fmt: skip
        return dropped

    def next_batch(
        self, endpoint_id: int, limit: int, after: int | None = None
    ) -> list[tuple[int, dict[str, Any]]]:
        """The oldest records an endpoint has not received: (position, record); past `after`
        too when given (what its worker posted and has not recorded yet)."""
        return [
            (pos, json.loads(body)) for pos, body in self.next_batch_json(endpoint_id, limit, after)
        ]

    def next_batch_json(
        self, endpoint_id: int, limit: int, after: int | None = None
    ) -> list[tuple[int, str]]:
        """Like `next_batch`, each record as the JSON it is stored as (posted as it is).
        Nothing for an endpoint not placed in the log yet."""
        parameters = {
            "endpoint": endpoint_id,
            "limit": limit,
            "after": -1 if after is None else after,
        }
        with self.link.connect() as connection:
            rows = connection.execute(NEXT_BATCH, parameters).all()
        return [(int(pos), body) for pos, body in rows]

    def delivered(self, endpoint_id: int, through: int | None, now: float) -> None:
        """Record a successful POST: of the records up to position `through` (None: only a
        heartbeat)."""
        token = self.fence.token()
        with writing(self.link), Session(self.link) as session:
            values: dict[str, Any] = {"failures": 0, "last_success_at": now}
            position = _position(session, endpoint_id)
            if through is not None and position is not None and through > position:
                # Only what is past the position counts (the bounds may have dropped some
                # meanwhile): each record is counted once, delivered or dropped.
                count = _records_between(session, position, through)
                values |= {"through_pos": through,
                           "delivered": SentinelDelivery.delivered + count}  # fmt: skip
            _update_status(session, endpoint_id, placed=position is not None, **values)
            self._commit_fenced(session, token)

    def failed(self, endpoint_id: int, error: str, now: float) -> int:
        """Record a failed delivery; the number of consecutive failures."""
        token = self.fence.token()
        with Session(self.link) as session:
            _update_status(session, endpoint_id, failures=SentinelDelivery.failures + 1,
                           last_error=error[:1000], last_error_at=now)  # fmt: skip
            failures = session.exec(
                select(SentinelDelivery.failures).where(SentinelDelivery.endpoint_id == endpoint_id)
            ).one()
            self._commit_fenced(session, token)
            return int(failures)

    def status(self) -> dict[int, dict[str, Any]]:
        """Per endpoint id placed in the log: backlog and delivery status."""
        with Session(self.link) as session:
            head = _head(session)
            rows = list(session.exec(select(SentinelDelivery)))
        return {
            row.endpoint_id: {
                "backlog": head - row.through_pos,
                "delivered": row.delivered,
                "dropped": row.dropped,
                "failures": row.failures,
                "last_success_at": row.last_success_at,
                "last_error": row.last_error or None,
                "last_error_at": row.last_error_at,
            }
            for row in rows
        }

    def undelivered_records(self) -> int:
        """Records some endpoint has not received yet (what a passive_legacy failover loses)."""
        endpoint_ids = [e.id for e in self.endpoints()]
        with Session(self.link) as session:
            lowest = session.execute(
                select(func.min(DELIVERY.c.through_pos)).where(
                    DELIVERY.c.endpoint_id.in_(endpoint_ids)
                )
            ).scalar()
            return 0 if lowest is None else _head(session) - int(lowest)

    def forget_endpoint(self, endpoint_id: int) -> None:
        with Session(self.link) as session:
            session.exec(
                delete(SentinelDelivery).where(col(SentinelDelivery.endpoint_id) == endpoint_id)
            )
            session.commit()
        self._placed.discard(endpoint_id)
        self._room.pop(endpoint_id, None)
        self._enforced_at.pop(endpoint_id, None)


def _head(session: Session) -> int:
    """The last position used: the highest record's, or an endpoint's if the purge removed
    the records up to it (so a position is never given twice to anyone placed past it); 0
    for an empty log."""
    record, endpoint = session.execute(HEAD).one()
    return max(int(record), int(endpoint))


def _position(session: Session, endpoint_id: int) -> int | None:
    """An endpoint's position, its row locked on PostgreSQL until the transaction ends (on
    SQLite the caller holds this process's write turn); None if it is not placed yet."""
    position = session.execute(POSITION.with_for_update(), {"endpoint": endpoint_id}).scalar()
    return None if position is None else int(position)


def _records_between(session: Session, after: int, through: int) -> int:
    """Records with positions in (after, through]."""
    found = session.execute(RECORDS_BETWEEN, {"after": after, "through": through})
    return int(found.scalar_one())


def _place(session: Session, endpoint_id: int) -> None:
    """Give an endpoint its row, at the end of the log, unless it has one: INSERT ..
    ON CONFLICT DO NOTHING, so the linker and the endpoint's worker may both try."""
    row = {"endpoint_id": endpoint_id, "through_pos": _head(session)}
    if session.get_bind().dialect.name == "postgresql":
        # Imported here: a server on SQLite does not load the PostgreSQL dialect (~2 MB).
        from sqlalchemy.dialects import postgresql

        session.execute(postgresql.insert(DELIVERY).values(**row).on_conflict_do_nothing())
    else:
        from sqlalchemy.dialects import sqlite

        session.execute(sqlite.insert(DELIVERY).values(**row).on_conflict_do_nothing())


def _update_status(session: Session, endpoint_id: int, placed: bool = False, **values: Any) -> None:
    """Change an endpoint's status row in place (increments are SQL expressions, so two
    threads never lose each other's counts); an endpoint not `placed` yet is placed first."""
    if not placed:
        _place(session, endpoint_id)
    session.execute(update(DELIVERY).where(DELIVERY.c.endpoint_id == endpoint_id).values(**values))
