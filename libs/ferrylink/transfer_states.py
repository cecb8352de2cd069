"""The transfer-state message (transaction manager -> sentinel link), and its publisher.

Self-contained on purpose: `TransferState` is to move into `contracts.py` with the other
typed, versioned messages.

The transfer-states queue is bounded (`FERRYLINK_TRANSFER_STATES_MAX_LENGTH`) with
`x-overflow: reject-publish`. Overflow policy: a state the broker rejects is dropped, counted
(`ferrylink_transfer_states_overflow_total`, `TransferStatePublisher.overflow`) and logged;
it is never re-published and never waited for, so a tracking outage can never stall event
processing. The transfer log in the database still holds every leg.
"""

from __future__ import annotations

import builtins
import logging
import threading
from concurrent.futures import Future
from datetime import datetime
from typing import Literal

from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, Field

from ferrylink.messaging import Publisher, PublishRejected

log = logging.getLogger(__name__)

TRANSFER_STATES_OVERFLOW = Counter(
    "ferrylink_transfer_states_overflow",
    "Transfer states rejected by the full transfer-states queue and dropped",
)

# The reference's vocabulary for transfer states.
TransferStatus = Literal[
    "TO_EXECUTE", "RECEIVING", "RECEIVED", "ROUTED", "SENDING", "SENT", "FAILED", "CANCELED",
    "AVAILABLE", "ACKED", "FORWARDED",
]  # fmt: skip


class TransferState(BaseModel):
    """One leg's state change, as published on `<prefix>.transfer-states`."""

    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    leg_key: str = Field(min_length=1, max_length=200)
    cycle_id: str = Field(min_length=1, max_length=64)
    event_id: str = Field(max_length=64)
    leg: str = Field(max_length=64)
    state: TransferStatus
    account: str = Field(max_length=64)
    file_name: str = Field(max_length=1024)
    bytes: int = 0
    direction: str = Field(max_length=16)
    protocol: str = Field(max_length=16)
    partner: str | None = None
    node: str = Field(max_length=64)
    at: datetime = Field(description="When the state was recorded (UTC).")
    detail: str = Field(default="", max_length=2000)

    @property
    def message_id(self) -> str:
        """Stable per (leg, state): a repeat of the same state is recognisable."""
        return f"{self.leg_key}:{self.state}"

    def to_bytes(self) -> builtins.bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, body: builtins.bytes) -> TransferState:
        return cls.model_validate_json(body)


class TransferStatePublisher:
    """Publishes transfer states on their own connection, whose nacks are final.

    `publish()` returns a future that resolves to True once the broker stored the state, or
    to False once the broker rejected it (the queue is full: counted, dropped). It never
    blocks on a full queue, and the shared publisher of events never sees its nacks.
    """

    def __init__(self, publisher: Publisher) -> None:
        self.publisher = publisher
        self._lock = threading.Lock()
        self.overflow = 0

    def publish(self, queue: str, state: TransferState) -> Future[bool]:
        outcome: Future[bool] = Future()
        confirm = self.publisher.publish("", queue, state.to_bytes(), message_id=state.message_id)

        def settle(done: Future[None]) -> None:
            error = done.exception()
            if error is None:
                outcome.set_result(True)
            elif isinstance(error, PublishRejected):
                self._count_overflow(queue, state)
                outcome.set_result(False)
            else:
                outcome.set_exception(error)

        confirm.add_done_callback(settle)
        return outcome

    def _count_overflow(self, queue: str, state: TransferState) -> None:
        with self._lock:
            self.overflow += 1
            total = self.overflow
        TRANSFER_STATES_OVERFLOW.inc()
        # The 1st, 2nd, 4th, 8th... and every 1000th: visible without flooding the log.
        if total & (total - 1) == 0 or total % 1000 == 0:
            log.warning(
                "%s is full: dropped transfer state %s (%d dropped so far)",
                queue,
                state.message_id,
                total,
            )
