"""Dead letters: parked messages are kept in the database with their reason, listed by the
API and replayed on request once the cause is fixed.

The keeper drains the event queue's dead-letter queue into `dead_event` rows (keyed by the
message id, so a repeat is harmless) and acks only after the row committed. It is the
primary's work: a row commits only while the database's epoch is this process's grant
(ferrylink.fencing); a fenced keeper's message goes back to the queue for the primary.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from ferrylink.clock import utcnow
from ferrylink.consumer_manager import Delivery
from ferrylink.contracts import REASON_HEADER, SOURCE_QUEUE_HEADER
from ferrylink.fencing import Fence, Unfenced
from ferrylink.tables.events import DeadEvent

log = logging.getLogger(__name__)


def reason_of(headers: dict[str, Any]) -> str:
    """Our own reason header, or the broker's (x-death) for a delivery-limit dead letter."""
    reason = headers.get(REASON_HEADER)
    if isinstance(reason, bytes):
        reason = reason.decode(errors="replace")
    if reason:
        return str(reason)
    deaths = headers.get("x-death") or []
    if deaths and isinstance(deaths[0], dict):
        why = deaths[0].get("reason", b"")
        why = why.decode() if isinstance(why, bytes) else str(why)
        return f"dead-lettered by the broker: {why}"
    return "unknown"


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, int | float | str | bool) or value is None:
        return value
    return str(value)


class DeadLetterKeeper:
    def __init__(self, engine: Engine, default_queue: str, fence: Fence | None = None) -> None:
        self.engine = engine
        self.default_queue = default_queue
        self.fence = fence or Unfenced()

    def __call__(self, delivery: Delivery) -> None:
        token = self.fence.token()
        message_id = delivery.message_id or "sha256-" + hashlib.sha256(delivery.body).hexdigest()
        source = delivery.headers.get(SOURCE_QUEUE_HEADER) or self.default_queue
        if isinstance(source, bytes):
            source = source.decode()
        with Session(self.engine) as session:
            dead = session.get(DeadEvent, message_id)
            if dead is not None and dead.replayed_at is None:
                return  # the same dead letter again
            # New, or replayed and failed again: keep the latest reason, listed again.
            dead = dead or DeadEvent(id=message_id, queue=str(source), body=delivery.body)
            dead.reason = reason_of(delivery.headers)[:1000]
            dead.headers_json = json.dumps(_plain(delivery.headers))
            dead.dead_at = utcnow()
            dead.replayed_at = None
            session.add(dead)
            session.flush()
            self.fence.check(session, token)
            session.commit()
        log.warning("dead letter %s kept: %s", message_id, reason_of(delivery.headers))


def replay(
    engine: Engine, republish: Callable[[str, bytes, str], Future[None]], dead_id: str
) -> DeadEvent | None:
    """Publish a kept dead letter to its queue again (fresh delivery count); None if unknown.

    Marked replayed before it is published: a replayed message that dies again at once is
    then kept as a new dead letter, not dropped as a repeat of the old one. If the publish
    fails the mark is taken back and the error raised."""
    with Session(engine, expire_on_commit=False) as session:
        dead = session.get(DeadEvent, dead_id)
        if dead is None:
            return None
        dead.replayed_at = utcnow()
        session.add(dead)
        session.commit()
        try:
            republish(dead.queue, dead.body, dead.id).result(timeout=30)
        except Exception:
            dead.replayed_at = None
            session.add(dead)
            session.commit()
            raise
        return dead
