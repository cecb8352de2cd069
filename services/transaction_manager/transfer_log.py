"""The consolidated transfer log: one row per leg of a file's journey, and every state change
published for the sentinel link.

A leg is keyed by `leg_key` (unique), so processing an event again updates its legs instead
of adding new ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from sqlmodel import Session, select

from ferrylink.clock import as_utc, utcnow
from ferrylink.contracts import FINAL_TRANSFER_STATUSES, TransferState, TransferStatus
from ferrylink.metrics import BYTES_RECEIVED, BYTES_SENT, FILES_RECEIVED, FILES_SENT
from ferrylink.models import Transfer

log = logging.getLogger(__name__)

# Short names for the states the transaction manager writes.
RECEIVING, RECEIVED, ROUTED = (
    TransferStatus.RECEIVING,
    TransferStatus.RECEIVED,
    TransferStatus.ROUTED,
)
SENDING, SENT, FAILED = TransferStatus.SENDING, TransferStatus.SENT, TransferStatus.FAILED


def count(leg: Transfer) -> None:
    """Files and bytes received and sent, once per committed state change."""
    protocol = leg.protocol or "unknown"
    if leg.status == RECEIVED:
        FILES_RECEIVED.labels(protocol=protocol).inc()
        BYTES_RECEIVED.labels(protocol=protocol).inc(leg.bytes or 0)
    elif leg.status == SENT:
        FILES_SENT.labels(protocol=protocol).inc()
        BYTES_SENT.labels(protocol=protocol).inc(leg.bytes or 0)


class TransferLog:
    """Writes legs and announces each state change on the transfer-states queue."""

    def __init__(self, publish: Callable[[TransferState], Future[Any]], node_id: str) -> None:
        self._publish = publish
        self.node_id = node_id

    def record(self, session: Session, leg_key: str, status: str, **fields: Any) -> Transfer:
        """Create or update the leg and commit; then publish its new state and wait for the
        broker's confirm."""
        leg = self.stage(session, leg_key, status, **fields)
        if leg is None:
            return session.exec(select(Transfer).where(Transfer.leg_key == leg_key)).one()
        session.commit()
        self.publish(leg).result(timeout=30)
        return leg

    def stage(self, session: Session, leg_key: str, status: str, **fields: Any
              ) -> Transfer | None:  # fmt: skip
        """Create or update the leg in the caller's transaction (not committed, not yet
        published); None when the leg is in that state already (a redelivered event)."""
        leg = session.exec(select(Transfer).where(Transfer.leg_key == leg_key)).first()
        now = utcnow()
        if leg is None:
            leg = Transfer(leg_key=leg_key, status=status, node_id=self.node_id, **fields)
        elif leg.status == status:
            return None
        else:
            for name, value in fields.items():
                setattr(leg, name, value)
            leg.status = status
            leg.node_id = self.node_id
        if status in FINAL_TRANSFER_STATUSES:
            leg.finished_at = now
            started = as_utc(leg.started_at)
            leg.duration_ms = int((now - started).total_seconds() * 1000)
        session.add(leg)
        return leg

    def publish(self, leg: Transfer) -> Future[Any]:
        """Announce a committed leg state (and count it). The future resolves on the broker's
        answer (a full transfer-states queue drops and counts the state, never waited for)."""
        count(leg)
        # At least once: the sentinel link drops repeats by the state's id (leg key, state).
        return self._publish(
            TransferState(
                leg_key=leg.leg_key, cycle_id=leg.cycle_id, event_id=leg.event_id, leg=leg.leg,
                state=TransferStatus(leg.status), account=leg.account, file_name=leg.file_name,
                bytes=leg.bytes or 0, direction=leg.direction, protocol=leg.protocol,
                partner=leg.partner, detail=leg.detail, node=self.node_id,
            )
        )  # fmt: skip
