"""Link data: each transfer state becomes a record with a sequence number per cycle, queued in
an outbox per endpoint, in one transaction (the broker message is acked after it commits).

Outbox overflow policy: an endpoint's outbox keeps at most `max_backlog` records, none older
than `max_age_seconds`; past either bound the OLDEST records are dropped, and counted in the
endpoint's `dropped` (shown by `GET /endpoints`). New endpoints get the records linked after
they were added (no backfill).

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
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table, bindparam, func, insert, or_, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete, select

from ferrylink.contracts import TransferState
from ferrylink.fencing import Fence, FencingToken, Unfenced
from ferrylink.models import (
    SentinelCycle,
    SentinelDelivery,
    SentinelEndpoint,
    SentinelLeg,
    SentinelOutbox,
    SentinelRecord,
)

log = logging.getLogger(__name__)

RECORD_TYPE = "transfer_state"
# A batch of states that meets another instance's commits is read again and linked up to
# this many times in all (an overlap around a failover is brief).
LINK_ATTEMPTS = 3
# The age bound is enforced at least this often while records are linked or delivered.
BOUNDS_PERIOD_SECONDS = 1.0

CYCLES: Table = SentinelCycle.__table__  # type: ignore[attr-defined]
LEGS: Table = SentinelLeg.__table__  # type: ignore[attr-defined]
RECORDS: Table = SentinelRecord.__table__  # type: ignore[attr-defined]
OUTBOX: Table = SentinelOutbox.__table__  # type: ignore[attr-defined]
HEARTBEAT_TYPE = "heartbeat"


# -- pure rules --------------------------------------------------------------------------------


def record_for(state: TransferState, seq: int) -> dict[str, Any]:
    """What a receiver gets for one state; `id` is its idempotency key."""
    return {
        "type": RECORD_TYPE,
        "id": state.id,
        "cycle_id": state.cycle_id,
        "seq": seq,
        "leg": state.leg,
        "leg_key": state.leg_key,
        "status": state.state,
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
        # Per endpoint: how many records its outbox can still take before its bound (a low
        # estimate: deliveries only add room), and when its bounds were last enforced. The
        # bounds statement scans up to `max_backlog` rows, too much to run for every batch
        # while an endpoint is down with a long backlog.
        self._room: dict[int, int] = {}
        self._enforced_at: dict[int, float] = {}

    def _commit_fenced(self, session: Session, token: FencingToken) -> None:
        """Check the grant (in this transaction when the link data is in the shared
        database), then commit; `Fenced` leaves the transaction to be rolled back."""
        session.flush()
        if self.link is self.config:
            self.fence.check(session, token)
        else:
            self.fence.check_apart(self.config, token)
        session.commit()

    def endpoints(self) -> list[SentinelEndpoint]:
        with Session(self.config) as session:
            return list(session.exec(select(SentinelEndpoint).order_by(col(SentinelEndpoint.id))))

    def link_state(self, state: TransferState, endpoints: Sequence[SentinelEndpoint]) -> int | None:
        """Record `state` once and queue it for every endpoint; its seq, or None if it was
        linked before (a redelivered message)."""
        return self.link_states([state], endpoints)[0]

    def link_states(
        self, states: Sequence[TransferState], endpoints: Sequence[SentinelEndpoint]
    ) -> list[int | None]:
        """Record each state once and queue it for every endpoint, in order and in one
        transaction (a state's seq follows the states of its cycle before it, here or
        earlier); per state its seq, or None if it was linked before (a redelivered message,
        or a repeat in `states`)."""
        for _attempt in range(LINK_ATTEMPTS - 1):
            try:
                return self._link_states(states, endpoints)
            except IntegrityError:
                # Linked by another instance meanwhile (an overlap around a failover): read
                # again, and what it linked is a repeat.
                continue
        return self._link_states(states, endpoints)

    def _link_states(
        self, states: Sequence[TransferState], endpoints: Sequence[SentinelEndpoint]
    ) -> list[int | None]:
        token = self.fence.token()
        now = time.time()
        seqs: list[int | None] = [None] * len(states)
        with Session(self.link) as session:
            ids = {state.id for state in states}
            linked = set(
                session.exec(select(SentinelRecord.id).where(col(SentinelRecord.id).in_(ids)))
            )
            cycle_ids = {state.cycle_id for state in states}
            cycles = select(SentinelCycle.cycle_id, SentinelCycle.next_seq).where(
                col(SentinelCycle.cycle_id).in_(cycle_ids)
            )
            next_seq: dict[str, int] = dict(session.exec(cycles.with_for_update()).all())
            known_cycles = set(next_seq)
            leg_keys = {state.leg_key for state in states}
            known_legs = set(
                session.exec(
                    select(SentinelLeg.leg_key).where(col(SentinelLeg.leg_key).in_(leg_keys))
                )
            )
            legs: dict[str, dict[str, Any]] = {}
            records: list[dict[str, Any]] = []
            outbox: list[dict[str, Any]] = []
            for i, state in enumerate(states):
                if state.id in linked:
                    continue
                linked.add(state.id)
                seq = next_seq.get(state.cycle_id, 1)
                next_seq[state.cycle_id] = seq + 1
                seqs[i] = seq
                legs[state.leg_key] = {"leg_key": state.leg_key, "cycle_id": state.cycle_id,
                                       "status": state.state.value, "seq": seq,
                                       "updated_at": now}  # fmt: skip
                records.append({"id": state.id, "cycle_id": state.cycle_id, "seq": seq,
                                "body_json": json.dumps(record_for(state, seq)),
                                "linked_at": now})  # fmt: skip
                for endpoint in endpoints:
                    assert endpoint.id is not None
                    outbox.append({"endpoint_id": endpoint.id, "record_id": state.id,
                                   "created_at": now})  # fmt: skip
            if not records:
                return seqs
            write = session.connection().execute  # executemany, Core
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
            if outbox:
                write(insert(OUTBOX), outbox)
            try:
                self._commit_fenced(session, token)
            except IntegrityError:
                session.rollback()
                raise
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
        """Drop the oldest records past the endpoint's bounds; count them. Returns how many."""
        assert endpoint.id is not None
        token = self.fence.token()
        with Session(self.link) as session:
            # One DELETE, so the count and the choice of victims see the same rows (the
            # consumer and the endpoint's worker both run this): everything but the newest
            # `max_backlog`, and whatever is older than `max_age_seconds`.
            outbox = select(SentinelOutbox.id).where(SentinelOutbox.endpoint_id == endpoint.id)
            newest = outbox.order_by(col(SentinelOutbox.id).desc()).offset(endpoint.max_backlog)
            result = session.exec(
                delete(SentinelOutbox).where(
                    col(SentinelOutbox.endpoint_id) == endpoint.id,
                    or_(
                        col(SentinelOutbox.id).in_(newest.scalar_subquery()),
                        col(SentinelOutbox.created_at) < now - endpoint.max_age_seconds,
                    ),
                )
            )
            dropped = int(result.rowcount)
            backlog = session.exec(
                select(func.count()).where(col(SentinelOutbox.endpoint_id) == endpoint.id)
            ).one()
            if dropped:
                _update_status(session, endpoint.id, dropped=SentinelDelivery.dropped + dropped)
                self._commit_fenced(session, token)
            else:
                session.rollback()
        self._room[endpoint.id] = max(0, endpoint.max_backlog - int(backlog))
        self._enforced_at[endpoint.id] = now
        if not dropped:
            return 0
        log.warning("endpoint %s: backlog over its bound, dropped %d oldest", endpoint.name,
                    dropped)  # fmt: skip
        return dropped

    def next_batch(self, endpoint_id: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """The oldest queued records of an endpoint: (outbox id, record)."""
        return [
            (row_id, json.loads(body)) for row_id, body in self.next_batch_json(endpoint_id, limit)
        ]

    def next_batch_json(self, endpoint_id: int, limit: int) -> list[tuple[int, str]]:
        """Like `next_batch`, each record as the JSON it is stored as (posted as it is)."""
        with Session(self.link) as session:
            rows = session.exec(
                select(SentinelOutbox.id, SentinelRecord.body_json)
                .join(SentinelRecord, col(SentinelRecord.id) == col(SentinelOutbox.record_id))
                .where(SentinelOutbox.endpoint_id == endpoint_id)
                .order_by(col(SentinelOutbox.id))
                .limit(limit)
            ).all()
        return [(int(row_id or 0), body) for row_id, body in rows]

    def delivered(self, endpoint_id: int, outbox_ids: Sequence[int], now: float) -> None:
        token = self.fence.token()
        with Session(self.link) as session:
            # Only what this call removed counts (the bounds may have dropped some meanwhile):
            # each outbox row is counted once, delivered or dropped.
            count = _deleted(session, outbox_ids)
            _update_status(session, endpoint_id, delivered=SentinelDelivery.delivered + count,
                           failures=0, last_success_at=now)  # fmt: skip
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
        """Per endpoint id: backlog and delivery status."""
        with Session(self.link) as session:
            backlogs = dict(
                session.exec(
                    select(SentinelOutbox.endpoint_id, func.count()).group_by(
                        col(SentinelOutbox.endpoint_id)
                    )
                ).all()
            )
            rows = {d.endpoint_id: d for d in session.exec(select(SentinelDelivery))}
        found: dict[int, dict[str, Any]] = {}
        for endpoint_id in set(backlogs) | set(rows):
            row = rows.get(endpoint_id) or SentinelDelivery(endpoint_id=endpoint_id)
            found[endpoint_id] = {
                "backlog": int(backlogs.get(endpoint_id, 0)),
                "delivered": row.delivered,
                "dropped": row.dropped,
                "failures": row.failures,
                "last_success_at": row.last_success_at,
                "last_error": row.last_error or None,
                "last_error_at": row.last_error_at,
            }
        return found

    def undelivered_records(self) -> int:
        """Records some endpoint has not received yet (what a passive_legacy failover loses)."""
        with Session(self.link) as session:
            return int(
                session.exec(select(func.count(func.distinct(SentinelOutbox.record_id)))).one()
            )

    def forget_endpoint(self, endpoint_id: int) -> None:
        with Session(self.link) as session:
            session.exec(
                delete(SentinelOutbox).where(col(SentinelOutbox.endpoint_id) == endpoint_id)
            )
            session.exec(
                delete(SentinelDelivery).where(col(SentinelDelivery.endpoint_id) == endpoint_id)
            )
            session.commit()


def _deleted(session: Session, outbox_ids: Sequence[int]) -> int:
    """Delete outbox rows; how many this transaction removed (another may have been first)."""
    if not outbox_ids:
        return 0
    result = session.exec(delete(SentinelOutbox).where(col(SentinelOutbox.id).in_(outbox_ids)))
    return int(result.rowcount)


def _update_status(session: Session, endpoint_id: int, **values: Any) -> None:
    """Change an endpoint's status row in place (increments are SQL expressions, so two
    threads never lose each other's counts). The consumer (bounds) and the endpoint's worker
    (deliveries) may both write the first row: it is created with INSERT .. ON CONFLICT DO
    NOTHING, so neither fails on the other's insert."""
    table = SentinelDelivery.__table__  # type: ignore[attr-defined]
    if session.get_bind().dialect.name == "postgresql":
        # Imported here: a server on SQLite does not load the PostgreSQL dialect (~2 MB).
        from sqlalchemy.dialects import postgresql

        session.exec(
            postgresql.insert(table).values(endpoint_id=endpoint_id).on_conflict_do_nothing()
        )
    else:
        from sqlalchemy.dialects import sqlite

        session.exec(sqlite.insert(table).values(endpoint_id=endpoint_id).on_conflict_do_nothing())
    session.exec(
        update(SentinelDelivery)
        .where(col(SentinelDelivery.endpoint_id) == endpoint_id)
        .values(**values)
    )
