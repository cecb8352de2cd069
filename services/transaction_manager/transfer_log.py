"""The consolidated transfer log: one row per leg of a file's journey, and every state change
published for the sentinel link (through the outbox, committed with the leg).

A leg is keyed by `leg_key` (unique), so processing an event again updates its legs instead
of adding new ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

from opentelemetry.context import Context
from sqlalchemy.engine import Connection
from sqlmodel import Session, select

from ferrylink.clock import as_utc, utcnow
from ferrylink.contracts import (
    FINAL_TRANSFER_STATUSES,
    TransferState,
    TransferStates,
    TransferStatus,
)
from ferrylink.metrics import BYTES_RECEIVED, BYTES_SENT, FILES_RECEIVED, FILES_SENT
from ferrylink.tables.transfers import Transfer
from ferrylink.transfer_states import DirectOutlet, StateOutlet

log = logging.getLogger(__name__)

# Short names for the states the transaction manager writes.
RECEIVING, RECEIVED, ROUTED = (
    TransferStatus.RECEIVING,
    TransferStatus.RECEIVED,
    TransferStatus.ROUTED,
)
SENDING, SENT, FAILED = TransferStatus.SENDING, TransferStatus.SENT, TransferStatus.FAILED


def next_revision(current: int | None) -> int:
    """A leg's revision after a state change: 1 for a new leg (None), one more otherwise.
    Every writer of a leg's state uses it, so a leg's states are ordered by it."""
    return 1 if current is None else current + 1


def count(leg: Transfer | Mapping[str, Any]) -> None:
    """Files and bytes received and sent, once per committed state change."""
    row = leg if isinstance(leg, Mapping) else _columns(leg)
    protocol = row["protocol"] or "unknown"
    if row["status"] == RECEIVED:
        FILES_RECEIVED.labels(protocol=protocol).inc()
        BYTES_RECEIVED.labels(protocol=protocol).inc(row["bytes"] or 0)
    elif row["status"] == SENT:
        FILES_SENT.labels(protocol=protocol).inc()
        BYTES_SENT.labels(protocol=protocol).inc(row["bytes"] or 0)


# What a transfer state says of its leg.
STATE_COLUMNS = ("leg_key", "cycle_id", "event_id", "leg", "status", "account", "file_name",
                 "bytes", "direction", "protocol", "partner", "detail", "revision")  # fmt: skip


def _columns(leg: Transfer) -> dict[str, Any]:
    """A leg's announced columns, read through the ORM (an expired row loads again)."""
    return {name: getattr(leg, name) for name in STATE_COLUMNS}


@dataclass
class StagedLeg:
    """A leg state in an uncommitted transaction, with its transfer-state message (in the
    outbox of the same transaction); `TransferLog.publish` it once committed."""

    leg: Transfer
    state: Any  # the outlet's token


class TransferLog:
    """Writes legs and announces each state change on the transfer-states queue, through the
    outbox: the state message is committed with the leg, so a crash after the commit delays
    it (the relay publishes it), never loses it."""

    def __init__(
        self,
        states: StateOutlet | Callable[[TransferState | TransferStates], Future[Any]],
        node_id: str,
    ) -> None:
        self._states: StateOutlet = states if not callable(states) else DirectOutlet(states)
        self.node_id = node_id

    def record(self, session: Session, leg_key: str, status: str, **fields: Any) -> Transfer:
        """Create or update the leg and commit; then publish its new state and wait (a
        while) for the broker's answer."""
        staged = self.stage(session, leg_key, status, **fields)
        if staged is None:
            return session.exec(select(Transfer).where(Transfer.leg_key == leg_key)).one()
        session.commit()
        settle([self.publish(staged)])
        return staged.leg

    def stage(self, session: Session, leg_key: str, status: str, **fields: Any
              ) -> StagedLeg | None:  # fmt: skip
        """Create or update the leg in the caller's transaction, with its state message (not
        committed, not yet published); None when the leg is in that state already (a
        redelivered event)."""
        leg = session.exec(select(Transfer).where(Transfer.leg_key == leg_key)).first()
        now = utcnow()
        if leg is None:
            leg = Transfer(leg_key=leg_key, status=status, node_id=self.node_id,
                           revision=next_revision(None), **fields)  # fmt: skip
        elif leg.status == status:
            return None
        else:
            for name, value in fields.items():
                setattr(leg, name, value)
            leg.status = status
            leg.node_id = self.node_id
            leg.revision = next_revision(leg.revision)
        if status in FINAL_TRANSFER_STATUSES:
            leg.finished_at = now
            started = as_utc(leg.started_at)
            leg.duration_ms = int((now - started).total_seconds() * 1000)
        session.add(leg)
        return self.announce(session, leg)

    def announce(self, session: Session, leg: Transfer) -> StagedLeg:
        """Stage the state message of `leg` (as it is now) in the caller's transaction."""
        return StagedLeg(leg, self._states.stage(session, self.state(_columns(leg))))

    def state(self, row: Mapping[str, Any]) -> TransferState:
        """The state message of a leg (its columns by name)."""
        # At least once: the sentinel link drops repeats by the state's id (leg key, state).
        return TransferState(
            leg_key=row["leg_key"], cycle_id=row["cycle_id"], event_id=row["event_id"],
            leg=row["leg"], state=TransferStatus(row["status"]), account=row["account"],
            file_name=row["file_name"], bytes=row["bytes"] or 0, direction=row["direction"],
            protocol=row["protocol"], partner=row["partner"], detail=row["detail"],
            node=self.node_id, revision=row["revision"] or 0,
        )  # fmt: skip

    def prepare_rows(self, rows: Sequence[Mapping[str, Any]],
                     traces: Sequence[Context]) -> list[Any]:  # fmt: skip
        """The state messages of many legs (their columns by name; each announced in its
        trace context), as few messages, in order: made before their transaction."""
        return self._states.prepare_many([self.state(row) for row in rows], traces)

    def announce_prepared(self, connection: Connection, prepared: Sequence[Any]) -> list[Any]:
        """Stage `prepare_rows`' messages in the caller's Core transaction (one statement);
        `send` them once committed."""
        return self._states.stage_prepared(connection, prepared)

    def send(self, rows: Sequence[Mapping[str, Any]], staged: Sequence[Any]) -> list[Future[Any]]:
        """Send the committed states `announce_prepared` staged for `rows` (and count them)."""
        for row in rows:
            count(row)
        return self._states.send(staged)

    def publish(self, staged: StagedLeg) -> Future[Any]:
        """Send a committed leg's state (and count it). The future resolves on the broker's
        answer: stored, or dropped because the transfer-states queue is full (counted; a
        nack for another reason is published again)."""
        count(staged.leg)
        return self._states.send([staged.state])[0]


def settle(futures: Sequence[Future[Any]], timeout: float = 30.0) -> None:
    """Wait for the broker's answers to published states, at most `timeout` seconds. Not
    answered by then (the broker is away): the states are in the outbox, and the relay
    publishes them later; nothing to do here."""
    deadline = time.monotonic() + timeout
    for future in futures:
        try:
            future.result(max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            log.warning("transfer states not confirmed within %.0f s; the outbox keeps them",
                        timeout)  # fmt: skip
            return
        except Exception as exc:  # closed: the relay publishes it
            log.warning("transfer state not published (%s); the outbox keeps it", exc)
