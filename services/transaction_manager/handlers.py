"""Event handlers of the transaction manager: validate, then dispatch by kind.

Idempotent by event id: a completed event has a `processed_event` row, and the work of a
half-done one is resumed step by step (see routing.py), so a redelivered event (after a
crash, a cancel or a failover) completes the work once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import assert_never

from opentelemetry import trace
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from ferrylink.contracts import Event, FileArrived, MaintenanceRun, TransferScheduled
from ferrylink.models import ProcessedEvent
from services.transaction_manager import scheduled
from services.transaction_manager.routing import RouteRunner

log = logging.getLogger(__name__)
tracer = trace.get_tracer("ferrylink.transaction-manager")


class EventHandler:
    """Reacts to every event on the event queue (shared, or the node's own)."""

    def __init__(
        self,
        engine: Engine,
        node_id: str,
        routes: RouteRunner,
        data_dir: Path,
        publish: Callable[[FileArrived], Future[None]],
    ) -> None:
        self.engine = engine
        self.node_id = node_id
        self.routes = routes
        self.data_dir = data_dir
        self.publish = publish

    def handle(self, event: Event) -> None:
        with tracer.start_as_current_span("handle event") as span:
            span.set_attribute("ferrylink.event_id", event.id)
            span.set_attribute("ferrylink.event_kind", event.kind)
            span.set_attribute("ferrylink.cycle_id", event.cycle_id)
            self.process(event)

    def process(self, event: Event) -> bool:
        """Complete `event` once; False if it had been completed before."""
        match event:
            case FileArrived():
                return self.routes.process(event)
            case TransferScheduled():
                scheduled.run_scheduled_transfer(
                    event, self.engine, self.data_dir, self.node_id, self.publish, self.routes.log
                )
                return self._complete(event)
            case MaintenanceRun():
                scheduled.run_maintenance(event, self.engine, self.data_dir, self.node_id)
                return self._complete(event)
            case _:
                assert_never(event)

    def _complete(self, event: Event) -> bool:
        with Session(self.engine) as session:
            if session.get(ProcessedEvent, event.id) is not None:
                return False
            session.add(
                ProcessedEvent(
                    event_id=event.id,
                    kind=event.kind,
                    node_id=self.node_id,
                    processed_at=time.time(),
                )
            )
            try:
                session.commit()
            except IntegrityError:  # another server completed it in the meantime
                session.rollback()
                return False
        return True
