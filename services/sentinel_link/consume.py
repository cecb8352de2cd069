"""The transfer-states consumer: one worker, so states are linked in queue order; the
message is acked only after its records committed (the consumer manager acks on return)."""

from __future__ import annotations

from ferrylink.contracts import TransferState
from services.sentinel_link.link import LinkStore


class StateHandler:
    def __init__(self, store: LinkStore) -> None:
        self.store = store

    def handle(self, state: TransferState) -> None:
        self.store.link_state(state, self.store.endpoints())
