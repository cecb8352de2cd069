"""Event handlers of the transaction manager: validate, then dispatch by kind.

Idempotent by event id: a completed event has a `processed_event` row, and the work of a
half-done one is resumed step by step (see routing.py), so a redelivered event (after a
crash, a cancel or a failover) completes the work once.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import Callable
from pathlib import Path

from opentelemetry import trace
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from ferrylink.consumer_manager import Delivery, RejectMessage
from ferrylink.events import Event, parse_event
from ferrylink.models import ProcessedEvent
from ferrylink.telemetry import extract_context
from services.transaction_manager.routing import RouteRunner

log = logging.getLogger(__name__)
tracer = trace.get_tracer("ferrylink.transaction-manager")


class EventHandler:
    def __init__(
        self,
        engine: Engine,
        node_id: str,
        routes: RouteRunner,
        data_dir: Path,
        publish: Callable[[Event], None],
    ) -> None:
        self.engine = engine
        self.node_id = node_id
        self.routes = routes
        self.data_dir = data_dir
        self.publish = publish

    def __call__(self, delivery: Delivery) -> None:
        with tracer.start_as_current_span(
            "handle event", context=extract_context(delivery.headers)
        ) as span:
            event = parse_event(delivery)
            span.set_attribute("ferrylink.event_id", event.id)
            span.set_attribute("ferrylink.event_kind", event.kind)
            span.set_attribute("ferrylink.cycle_id", event.cycle_id)
            self.process(event)

    def process(self, event: Event) -> bool:
        """Complete `event` once; False if it had been completed before."""
        if event.kind == "file.arrived":
            return self.routes.process(event)
        if event.kind == "transfer.scheduled":
            scheduled = importlib.import_module("services.transaction_manager.scheduled")
            scheduled.run_scheduled_transfer(
                event, self.engine, self.data_dir, self.node_id, self.publish, self.routes.log
            )
            return self._complete(event)
        if event.kind == "maintenance.run":
            scheduled = importlib.import_module("services.transaction_manager.scheduled")
            scheduled.run_maintenance(event, self.engine, self.data_dir, self.node_id)
            return self._complete(event)
        raise RejectMessage(f"the transaction manager does not handle {event.kind!r} events")

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
