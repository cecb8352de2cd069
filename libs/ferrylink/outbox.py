"""The outbox: messages committed with their cause, published until confirmed.

`stage()` adds the message to the caller's transaction. After the commit the caller
publishes it at once (`send()`), and deletes the row on the broker's confirm. The relay (on
every TM) re-publishes rows left behind by a crash or a failed publish once they are older
than `RELAY_AFTER_SECONDS`; a message may so go out twice, never zero times, and consumers
drop repeats by message id (events by their claim and processed row, transfer states by
the sentinel link's record id). Transfer states are staged here too, with their leg
(ferrylink.transfer_states publishes and settles them).

Nothing stays for ever: a row is deleted once confirmed (or, for a transfer state, once
dropped by its full queue). A row the relay cannot publish for days (its queue is gone) is
moved to the dead letters by the `outbox_purge` maintenance kind, never deleted unseen.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from sqlalchemy import Table, insert
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, col, delete, select

from ferrylink.messaging import Publisher
from ferrylink.tables.outbox import OutboxMessage

log = logging.getLogger(__name__)

RELAY_AFTER_SECONDS = 5.0
RELAY_BATCH = 500


def stage(session: Session, routing_key: str, body: bytes, message_id: str,
          headers: dict[str, Any] | None = None) -> OutboxMessage:  # fmt: skip
    row = OutboxMessage(routing_key=routing_key, body=body, message_id=message_id,
                        headers_json=json.dumps(headers or {}), created_at=time.time())  # fmt: skip
    session.add(row)
    return row


def row(routing_key: str, body: bytes, message_id: str,
        headers: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """An outbox row's columns, for `stage_many`."""
    return {"routing_key": routing_key, "body": body, "message_id": message_id,
            "headers_json": json.dumps(headers or {}), "created_at": time.time()}  # fmt: skip


def stage_many(connection: Connection, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Add rows (`row()`) to the caller's Core transaction with one statement; their ids,
    in order."""
    if not rows:
        return []
    table: Table = OutboxMessage.__table__  # type: ignore[attr-defined]
    statement = insert(table).returning(table.c.id, sort_by_parameter_order=True)
    return [int(i) for i in connection.execute(statement, list(rows)).scalars()]


def send(engine: Engine, publisher: Publisher, rows: Iterable[OutboxMessage],
         timeout: float = 30.0) -> None:  # fmt: skip
    """Publish committed rows, wait for the confirms, then delete the confirmed rows (all of
    them, even when some failed: those stay for the relay); raises the first failure."""
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
    deadline = time.monotonic() + timeout
    confirmed: list[int] = []
    failure: BaseException | None = None
    for row, future in zip(rows, futures, strict=True):
        try:
            future.result(max(0.0, deadline - time.monotonic()))
        except Exception as exc:
            failure = failure or exc
            continue
        if row.id is not None:
            confirmed.append(row.id)
    if confirmed:
        with Session(engine) as session:
            session.exec(delete(OutboxMessage).where(col(OutboxMessage.id).in_(confirmed)))
            session.commit()
    if failure is not None:
        raise failure


def left_behind(engine: Engine, limit: int = RELAY_BATCH) -> list[OutboxMessage]:
    """The oldest rows not published by whoever staged them (older than
    RELAY_AFTER_SECONDS)."""
    with Session(engine) as session:
        return list(
            session.exec(
                select(OutboxMessage)
                .where(col(OutboxMessage.created_at) < time.time() - RELAY_AFTER_SECONDS)
                .order_by(col(OutboxMessage.id))
                .limit(limit)
            ).all()
        )


class OutboxRelay:
    """Publishes what was left in the outbox; runs on every TM, whatever its assignment.

    `publish_rows` publishes a batch of rows and deletes those confirmed (the runtime sends
    transfer states through their own publisher, everything else through the shared one);
    `ready` says whether the broker is reachable at all."""

    def __init__(
        self,
        engine: Engine,
        publish_rows: Callable[[list[OutboxMessage]], None],
        ready: Callable[[], bool],
        interval: float = 2.0,
    ) -> None:
        self.engine = engine
        self.publish_rows = publish_rows
        self.ready = ready
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-relay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def relay_once(self) -> int:
        rows = left_behind(self.engine)
        if rows:
            log.info("outbox: publishing %d message(s) left behind", len(rows))
            self.publish_rows(rows)
        return len(rows)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.ready():
                continue
            try:
                self.relay_once()
            except Exception as exc:  # the database or the broker: next round
                log.warning("outbox relay: %s", exc)
