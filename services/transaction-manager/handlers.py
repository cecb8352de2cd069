"""Event handlers of the transaction manager.

Idempotent by event id: the handler's work and the event's `processed_event` row commit in
one transaction, so a redelivered event (after a crash, a cancel or a failover) is a no-op.
"""

from __future__ import annotations

import logging
import time

from opentelemetry import trace
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from ferrylink.consumer_manager import Delivery
from ferrylink.events import Event, parse_event
from ferrylink.models import ProcessedEvent
from ferrylink.telemetry import extract_context

log = logging.getLogger(__name__)
tracer = trace.get_tracer("ferrylink.transaction-manager")


class EventHandler:
    def __init__(self, engine: Engine, node_id: str) -> None:
        self.engine = engine
        self.node_id = node_id

    def __call__(self, delivery: Delivery) -> None:
        with tracer.start_as_current_span(
            "handle event", context=extract_context(delivery.headers)
        ) as span:
            event = parse_event(delivery)
            span.set_attribute("ferrylink.event_id", event.id)
            span.set_attribute("ferrylink.event_kind", event.kind)
            self.process(event)

    def process(self, event: Event) -> bool:
        """Complete `event` once; False if it had been completed before."""
        with Session(self.engine) as session:
            if session.get(ProcessedEvent, event.id) is not None:
                log.info("event %s already processed; acknowledging the redelivery", event.id)
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
