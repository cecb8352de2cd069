"""An in-memory stand-in for the runtime's messaging, for fast tests (faststream's
TestRabbitBroker and nameko's worker_factory are the models).

It offers what services use - `publish`, `publish_all`, `consume` - and keeps each
published message as bytes on its destination. `deliver()` hands queued messages to the
consumers through the same parse-and-dispatch path the real runtime uses
(`ferrylink.runtime.typed_handler`), so a message crosses its JSON form exactly as it does
on the broker; a message its handler rejects is parked on `<queue>.dead` with the reason,
and one it asks to retry later goes to the back of its queue.
What needs a real broker (failover, redelivery, confirms) is tested against RabbitMQ.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TypeVar

from pydantic import TypeAdapter

from ferrylink.consumer_manager import Delivery
from ferrylink.contracts import (
    STATE_MESSAGE,
    Contract,
    RejectMessage,
    RetryLater,
    TransferState,
    destination,
    message_id,
    parse,
    states_of,
)
from ferrylink.runtime import typed_handler

M = TypeVar("M")


@dataclass(frozen=True)
class DeadLetter:
    body: bytes
    reason: str


class InMemoryBus:
    def __init__(self) -> None:
        self.queues: dict[str, deque[tuple[str, bytes]]] = defaultdict(deque)
        self.dead: dict[str, list[DeadLetter]] = defaultdict(list)
        self._consumers: dict[str, Callable[[Delivery], None]] = {}
        # Set to make the next publish fail, as a broker that does not confirm would.
        self.fail_next_publish: Exception | None = None

    # -- the runtime's surface ------------------------------------------------------------------

    def publish(self, message: Contract) -> Future[None]:
        confirm: Future[None] = Future()
        if self.fail_next_publish is not None:
            confirm.set_exception(self.fail_next_publish)
            self.fail_next_publish = None
            return confirm
        _kind, name = destination(message)
        self.queues[name].append((message_id(message), message.to_bytes()))
        confirm.set_result(None)
        return confirm

    def publish_all(self, messages: Iterable[Contract], timeout: float = 30.0) -> None:
        for message in messages:
            self.publish(message).result(timeout)

    def consume(
        self, queue: str, handler: Callable[[M], object], contract: type[M] | TypeAdapter[M]
    ) -> None:
        self._consumers[queue] = typed_handler(handler, contract)

    # -- what tests use -------------------------------------------------------------------------

    def put_raw(self, queue: str, body: bytes, message_id: str = "raw") -> None:
        """Queue bytes as a misbehaving sender would."""
        self.queues[queue].append((message_id, body))

    def messages(self, queue: str, contract: type[M] | TypeAdapter[M]) -> list[M]:
        """What is queued on `queue`, parsed, left in place."""
        return [parse(contract, body) for _id, body in self.queues[queue]]

    def transfer_states(self) -> list[TransferState]:
        """The transfer states queued, one by one in order (a batch commit's message
        carries several)."""
        return [
            state
            for message in self.messages("transfer-states", STATE_MESSAGE)
            for state in states_of(message)
        ]

    def deliver(self, limit: int = 10_000) -> int:
        """Run consumers until none has a message left (handlers may publish more); returns
        how many messages were handled. A handler's other errors propagate, and the message
        stays queued, as a requeue would keep it."""
        handled = 0
        while handled < limit:
            ready = [q for q in self._consumers if self.queues[q]]
            if not ready:
                return handled
            for queue in ready:
                ident, body = self.queues[queue][0]
                delivery = Delivery(
                    queue=queue, body=body, headers={}, message_id=ident, routing_key=queue,
                    redelivered=False, delivery_count=0,
                )  # fmt: skip
                try:
                    self._consumers[queue](delivery)
                except RejectMessage as exc:
                    self.dead[f"{queue}.dead"].append(DeadLetter(body, str(exc)))
                except RetryLater:
                    # A delay queue, without the wait: to the back of the queue.
                    self.queues[queue].append((ident, body))
                self.queues[queue].popleft()
                handled += 1
        raise RuntimeError(f"still delivering after {limit} messages: a publish loop?")
