"""OpenTelemetry tracing, W3C trace context in AMQP headers, and JSON logs with trace ids."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from opentelemetry import context, propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor


def setup_tracing(service_name: str, node_id: str, otlp_endpoint: str = "") -> TracerProvider:
    """Install a tracer provider; spans go to `otlp_endpoint` (OTLP/HTTP) when it is set."""
    resource = Resource.create({"service.name": service_name, "service.instance.id": node_id})
    provider = TracerProvider(resource=resource)
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=otlp_endpoint)))
    trace.set_tracer_provider(provider)
    return provider


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
