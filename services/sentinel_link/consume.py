"""The transfer-states consumer: one worker, so states are linked in queue order. A message
carries one state or a batch commit's states (`TransferStates`); the messages that waited
together are linked in one transaction, and acked only after it committed (the consumer
manager acks on return)."""

from __future__ import annotations

from collections.abc import Sequence

from ferrylink.contracts import StateMessage, states_of
from ferrylink.runtime import Received
from services.sentinel_link.link import LinkStore


class StateHandler:
    def __init__(self, store: LinkStore) -> None:
        self.store = store

    def handle(self, message: StateMessage) -> None:
        self.store.link_states(states_of(message), self.store.endpoints())

    def handle_batch(self, items: Sequence[Received[StateMessage]]) -> list[None]:
        """Link what waited together; a failure (the database, the fence) fails them all,
        each then settled as its own handler's failure would be."""
        states = [state for item in items for state in states_of(item.message)]
        self.store.link_states(states, self.store.endpoints())
        return [None] * len(items)
