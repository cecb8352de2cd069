"""The outbox: messages committed with their cause, published until confirmed.

`stage()` adds the message to the caller's transaction. After the commit the caller
publishes it at once (`send()`), and deletes the row on the broker's confirm. The relay (on
every TM) re-publishes rows left behind by a crash or a failed publish once they are older
than `RELAY_AFTER_SECONDS`; a message may so go out twice, never zero times, and consumers
drop repeats by message id (events by their claim and processed row).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, delete, select

from ferrylink.messaging import Publisher, wait_all
from ferrylink.models import OutboxMessage

log = logging.getLogger(__name__)

RELAY_AFTER_SECONDS = 5.0
RELAY_BATCH = 500


def stage(session: Session, routing_key: str, body: bytes, message_id: str,
          headers: dict[str, Any] | None = None) -> OutboxMessage:  # fmt: skip
    row = OutboxMessage(routing_key=routing_key, body=body, message_id=message_id,
                        headers_json=json.dumps(headers or {}), created_at=time.time())  # fmt: skip
    session.add(row)
    return row


def send(engine: Engine, publisher: Publisher, rows: Iterable[OutboxMessage],
         timeout: float = 30.0) -> None:  # fmt: skip
    """Publish committed rows, wait for the confirms, then delete them."""
    rows = list(rows)
    futures = [
        publisher.publish(
            "",
            row.routing_key,
            row.body,
            headers=json.loads(row.headers_json),
            message_id=row.message_id,
        )  # fmt: skip
        for row in rows
    ]
    wait_all(futures, timeout)
    ids = [row.id for row in rows if row.id is not None]
    if ids:
        with Session(engine) as session:
            session.exec(delete(OutboxMessage).where(col(OutboxMessage.id).in_(ids)))
            session.commit()


class OutboxRelay:
    """Publishes what was left in the outbox; runs on every TM, whatever its assignment."""

    def __init__(self, engine: Engine, publisher: Publisher, interval: float = 2.0) -> None:
        self.engine = engine
        self.publisher = publisher
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def relay_once(self) -> int:
        with Session(self.engine) as session:
            rows = list(
                session.exec(
                    select(OutboxMessage)
                    .where(col(OutboxMessage.created_at) < time.time() - RELAY_AFTER_SECONDS)
                    .order_by(col(OutboxMessage.id))
                    .limit(RELAY_BATCH)
                ).all()
            )
        if rows:
            log.info("outbox: publishing %d message(s) left behind", len(rows))
            send(self.engine, self.publisher, rows)
        return len(rows)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.publisher.connected:
                continue
            try:
                self.relay_once()
            except Exception as exc:  # the database or the broker: next round
                log.warning("outbox relay: %s", exc)
