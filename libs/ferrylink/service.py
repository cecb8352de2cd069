"""What every Ferrylink process shares: its runtime (settings, database, broker links) and an
HTTP app with `/healthz`, `/readyz` and `/metrics`. A service's `main.py` builds one runtime,
registers its consumers and routes, and calls `serve()`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from sqlalchemy.engine import Engine

from ferrylink.consumer_manager import ConsumerManager
from ferrylink.db import create_tables, database_works, make_engine
from ferrylink.messaging import Publisher, Topology
from ferrylink.settings import FerrylinkSettings, redact_url
from ferrylink.telemetry import setup_logging, setup_tracing

log = logging.getLogger(__name__)

BROKER_CONNECTED = Gauge("ferrylink_broker_connected", "1 when the broker connections are up")
CONSUMERS_ACTIVE = Gauge(
    "ferrylink_consumer_active", "1 when the named consumer is consuming", ["consumer"]
)


class ServiceRuntime:
    """One process's connections: a database engine, a publisher and a consumer manager."""

    def __init__(self, service_name: str, settings: FerrylinkSettings) -> None:
        self.service_name = service_name
        self.settings = settings
        self.topology = Topology.from_settings(settings)
        self.engine: Engine = make_engine(settings.effective_database_url)
        self.publisher = Publisher(
            settings.amqp_urls, declare=self.topology.declare, name=f"{service_name}-publisher"
        )
        self.consumers = ConsumerManager(
            settings.amqp_urls,
            self.publisher,
            declare=self.topology.declare,
            delivery_limit=settings.delivery_limit,
            name=f"{service_name}-consumers",
        )
        self.consumers.on_change = self._on_consumers_changed

    def start(self) -> None:
        log.info(
            "starting %s on node %s, broker %s",
            self.service_name,
            self.settings.node_id,
            ", ".join(redact_url(u) for u in self.settings.amqp_urls),
        )
        create_tables(self.engine)
        self.publisher.start()
        self.consumers.start()

    def stop(self) -> None:
        self.consumers.stop()
        self.publisher.close()
        self.engine.dispose()

    def readiness(self) -> dict[str, bool]:
        checks = {
            "broker_publisher": self.publisher.connected,
            "broker_consumers": self.consumers.connected,
            "database": database_works(self.engine),
        }
        BROKER_CONNECTED.set(1 if checks["broker_publisher"] and checks["broker_consumers"] else 0)
        return checks

    def _on_consumers_changed(self, active: set[str]) -> None:
        for name in self.consumers.registered():
            CONSUMERS_ACTIVE.labels(consumer=name).set(1 if name in active else 0)


def create_app(
    runtime: ServiceRuntime, routers: Sequence[APIRouter] = (), description: str = ""
) -> FastAPI:
    """The service's FastAPI app; the runtime starts and stops with it."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        try:
            yield
        finally:
            runtime.stop()

    app = FastAPI(
        title=f"Ferrylink {runtime.service_name}",
        description=description,
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.runtime = runtime

    @app.get("/healthz", tags=["health"], summary="The process is alive")
    def healthz() -> dict[str, str]:
        return {
            "status": "ok",
            "service": runtime.service_name,
            "node": runtime.settings.node_id,
        }

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Ready when the broker connections and the database work (503 otherwise)",
    )
    def readyz(response: Response) -> dict[str, Any]:
        checks = runtime.readiness()
        ready = all(checks.values())
        if not ready:
            response.status_code = 503
        return {"ready": ready, "checks": checks, "node": runtime.settings.node_id}

    @app.get("/metrics", tags=["health"], summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for router in routers:
        app.include_router(router)
    return app


def serve(app: FastAPI, settings: FerrylinkSettings, service_name: str) -> None:
    """Run the app on uvicorn in the foreground until SIGINT/SIGTERM."""
    setup_logging(service_name, settings.node_id, settings.log_level)
    setup_tracing(service_name, settings.node_id, settings.otlp_endpoint)
    uvicorn.run(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
