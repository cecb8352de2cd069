"""The consolidated transfer log: one row per leg of a file's journey, and every state change
published for the sentinel link.

A leg is keyed by `leg_key` (unique), so processing an event again updates its legs instead
of adding new ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from datetime import datetime
from typing import Any

from sqlmodel import Session, select

from ferrylink.models import Transfer, utcnow
from ferrylink.transfer_states import TransferState, TransferStatePublisher

log = logging.getLogger(__name__)

# The reference's vocabulary for transfer states.
RECEIVING, RECEIVED, ROUTED, SENDING, SENT, FAILED, CANCELED = (
    "RECEIVING", "RECEIVED", "ROUTED", "SENDING", "SENT", "FAILED", "CANCELED",
)  # fmt: skip
FINAL_STATES = {RECEIVED, ROUTED, SENT, FAILED, CANCELED}


class TransferLog:
    """Writes legs and announces each state change on the transfer-states queue."""

    def __init__(
        self, publisher: TransferStatePublisher, states_queue: Callable[[], str], node_id: str
    ) -> None:
        self.publisher = publisher
        self.states_queue = states_queue
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
        if status in FINAL_STATES:
            leg.finished_at = now
            started = _aware(leg.started_at)
            leg.duration_ms = int((now - started).total_seconds() * 1000)
        session.add(leg)
        return leg

    def publish(self, leg: Transfer) -> Future[bool]:
        """Announce a committed leg state. The future resolves on the broker's answer: True
        stored, False rejected by the full queue (counted and dropped, never waited for)."""
        state = TransferState(
            leg_key=leg.leg_key,
            cycle_id=leg.cycle_id,
            event_id=leg.event_id,
            leg=leg.leg,
            state=leg.status,  # validated by the model: a status outside the vocabulary fails
            account=leg.account,
            file_name=leg.file_name,
            bytes=leg.bytes,
            direction=leg.direction,
            protocol=leg.protocol,
            partner=leg.partner,
            node=self.node_id,
            at=utcnow(),
            detail=leg.detail,
        )
        # At least once: the sentinel link drops repeats by (leg_key, state).
        return self.publisher.publish(self.states_queue(), state)


def _aware(moment: datetime) -> datetime:
    """SQLite hands datetimes back without a zone; they were written in UTC."""
    from datetime import UTC

    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
