"""The transfer-state publisher (the message itself is `contracts.TransferState`).

The transfer-states queue is bounded (`FERRYLINK_TRANSFER_STATES_MAX_LENGTH`) with
`x-overflow: reject-publish`. Overflow policy: a state the broker rejects is dropped, counted
(`ferrylink_transfer_states_overflow_total`, `TransferStatePublisher.overflow`) and logged;
it is never re-published and never waited for, so a tracking outage can never stall event
processing. The transfer log in the database still holds every leg.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future

from prometheus_client import Counter

from ferrylink.contracts import TransferState
from ferrylink.messaging import Publisher, PublishRejected
from ferrylink.telemetry import producer_span

log = logging.getLogger(__name__)

TRANSFER_STATES_OVERFLOW = Counter(
    "ferrylink_transfer_states_overflow",
    "Transfer states rejected by the full transfer-states queue and dropped",
)


class TransferStatePublisher:
    """Publishes transfer states on their own connection, whose nacks are final.

    `publish()` returns a future that resolves to True once the broker stored the state, or
    to False once the broker rejected it (the queue is full: counted, dropped). It never
    blocks on a full queue, and the shared publisher of events never sees its nacks.
    """

    def __init__(self, publisher: Publisher, queue: Callable[[], str]) -> None:
        self.publisher = publisher
        self.queue = queue  # shared, or the node's own in passive_legacy
        self._lock = threading.Lock()
        self.overflow = 0

    def publish(self, state: TransferState) -> Future[bool]:
        outcome: Future[bool] = Future()
        queue = self.queue()
        with producer_span("transfer-states", state.id) as headers:
            confirm = self.publisher.publish(
                "", queue, state.to_bytes(), message_id=state.id, headers=headers
            )

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
                state.id,
                total,
            )
