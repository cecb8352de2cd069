"""OpenTelemetry tracing, W3C trace context in AMQP headers, and JSON logs with trace ids."""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased

TRACER_NAME = "ferrylink"
# Standard variables that turn span export on (OTLP/HTTP); read by the exporter itself.
OTLP_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")


def setup_tracing(service_name: str, node_id: str, otlp_endpoint: str = "") -> bool:
    """Install a tracer provider, configured by the standard `OTEL_*` variables: spans are
    exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` (or the older
    FERRYLINK_OTLP_ENDPOINT) is set and `OTEL_TRACES_EXPORTER` is not `none`;
    `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and `OTEL_BSP_*`
    apply as usual. Returns whether spans are exported (then instrument the app too).

    Without an exporter, spans are not recorded (a sampler that records only what a caller
    asked for): trace and span ids are still made, flow through messages and requests and
    show in the logs, but a span costs a few microseconds instead of tens (a quarter of a
    busy transaction manager's CPU)."""
    attributes = {"service.instance.id": node_id}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes["service.name"] = service_name
    exporting = os.environ.get("OTEL_TRACES_EXPORTER", "otlp") != "none" and bool(
        otlp_endpoint or any(os.environ.get(v) for v in OTLP_ENDPOINT_VARIABLES)
    )
    # None: the standard OTEL_TRACES_SAMPLER (default: parent-based, always on).
    sampler = None if exporting else ParentBased(ALWAYS_OFF)
    provider = TracerProvider(resource=Resource.create(attributes), sampler=sampler)
    if exporting:
        # Only when exporting: an idle process without an exporter does not load them.
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        exporter = OTLPSpanExporter(endpoint=otlp_endpoint or None)  # None: from OTEL_*
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return exporting


def instrument_http(app: Any | None = None) -> None:
    """The official instrumentations: incoming requests of `app` (FastAPI: SERVER spans with
    http.* attributes, W3C context extracted) and every httpx client (CLIENT spans, context
    injected: partner pushes, tracking deliveries). Imported only when spans are exported:
    they cost memory in every process."""
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

    HTTPXClientInstrumentor().instrument()
    if app is not None:
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics,work")


@functools.cache
def tracer() -> trace.Tracer:
    """Ferrylink's tracer (made once: getting one costs more than a span; obtained before
    `setup_tracing`, it is a proxy that follows the provider installed later)."""
    return trace.get_tracer(TRACER_NAME)


def messaging_attributes(destination: str, operation: str, message_id: str = "") -> dict[str, Any]:
    """OpenTelemetry's messaging semantic conventions for a RabbitMQ message."""
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.destination.name": destination,
        "messaging.operation.type": operation,
        "messaging.operation.name": operation,
    }
    if message_id:
        attributes["messaging.message.id"] = message_id
    return attributes


@contextmanager
def producer_span(
    destination: str, message_id: str, links: Sequence[context.Context] = ()
) -> Iterator[dict[str, Any]]:
    """A PRODUCER span for one message; yields the headers carrying its trace context.
    `links`: other traces the message carries work of (a batch), linked to the span."""
    span_links = [
        trace.Link(linked)
        for linked in (trace.get_current_span(link).get_span_context() for link in links)
        if linked.is_valid
    ]
    with tracer().start_as_current_span(
        f"send {destination}",
        kind=trace.SpanKind.PRODUCER,
        attributes=messaging_attributes(destination, "send", message_id),
        links=span_links,
    ):
        yield inject_headers()


@contextmanager
def consumer_span(
    destination: str, headers: dict[str, Any], message_id: str = ""
) -> Iterator[trace.Span]:
    """A CONSUMER span continuing the trace the message carried; an exception escaping it
    marks the span as an error (RetryLater is not one: recorded as an event only)."""
    with tracer().start_as_current_span(
        f"process {destination}",
        context=extract_context(headers),
        kind=trace.SpanKind.CONSUMER,
        attributes=messaging_attributes(destination, "process", message_id),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except Exception as exc:
            if type(exc).__name__ == "RetryLater":
                span.add_event("retry later", {"reason": str(exc)})
            else:
                mark_error(span, exc)
            raise


def start_consumer_span(destination: str, headers: dict[str, Any], message_id: str = ""
                        ) -> tuple[trace.Span, context.Context]:  # fmt: skip
    """A CONSUMER span for one message of a batch, not made current: the span and the
    context to attach (`attached`) while working on that message; end it with
    `end_consumer_span`."""
    carried = extract_context(headers)
    span = tracer().start_span(
        f"process {destination}",
        context=carried,
        kind=trace.SpanKind.CONSUMER,
        attributes=messaging_attributes(destination, "process", message_id),
        record_exception=False,
        set_status_on_exception=False,
    )
    return span, trace.set_span_in_context(span, carried)


def end_consumer_span(span: trace.Span, error: BaseException | None) -> None:
    """End a batch message's CONSUMER span with its outcome (as `consumer_span` does)."""
    if error is not None:
        if type(error).__name__ == "RetryLater":
            span.add_event("retry later", {"reason": str(error)})
        else:
            mark_error(span, error)
    span.end()


@contextmanager
def attached(ctx: context.Context) -> Iterator[None]:
    """Make `ctx` the current context for the block (work on one message of a batch)."""
    token = context.attach(ctx)
    try:
        yield
    finally:
        context.detach(token)


def mark_error(span: trace.Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)[:500]))


def inject_headers(headers: dict[str, Any] | None = None) -> dict[str, Any]:
    """Add the current trace context (traceparent) to AMQP headers."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    result = dict(headers or {})
    result.update(carrier)
    return result


def extract_context(headers: dict[str, Any]) -> context.Context:
    """The trace context carried by AMQP headers (bytes values tolerated)."""
    carrier = {
        k: (v.decode() if isinstance(v, bytes) else str(v))
        for k, v in headers.items()
        if isinstance(v, str | bytes)
    }
    return propagate.extract(carrier)


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line, with the trace and span id of the current span if any."""

    def __init__(self, service_name: str, node_id: str) -> None:
        super().__init__()
        self.service_name = service_name
        self.node_id = node_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service_name,
            "node": self.node_id,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        span_context = trace.get_current_span().get_span_context()
        if span_context.is_valid:
            entry["trace_id"] = format(span_context.trace_id, "032x")
            entry["span_id"] = format(span_context.span_id, "016x")
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(service_name: str, node_id: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLogFormatter(service_name, node_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("pika").setLevel(logging.WARNING)
