"""The transfer-states consumer: one worker, so states are linked in queue order; the
message is acked only after its records committed (the consumer manager acks on return)."""

from __future__ import annotations

from pydantic import ValidationError

from ferrylink.consumer_manager import Delivery, RejectMessage
from ferrylink.transfer_states import TransferState
from services.sentinel_link.link import LinkStore


class StateHandler:
    def __init__(self, store: LinkStore) -> None:
        self.store = store

    def __call__(self, delivery: Delivery) -> None:
        try:
            state = TransferState.from_bytes(delivery.body)
        except ValidationError as exc:
            # To the dead-letter queue with its reason; never retried.
            raise RejectMessage(f"not a transfer state: {exc}") from exc
        self.store.link_state(state, self.store.endpoints())
