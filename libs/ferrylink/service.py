"""What every Ferrylink process shares: its runtime (settings, database, broker links, the
work it follows from the coordinator, heartbeats) and an HTTP app with `/healthz`, `/readyz`,
`/metrics` and `/work`. A service's `main.py` builds one runtime, registers its work units
and routes, and calls `serve()`."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from ferrylink.api_app import build_api
from ferrylink.cluster import Assignment, Heartbeat
from ferrylink.config import read_config_version
from ferrylink.consumer_manager import ConsumerManager, ConsumerSpec, Delivery
from ferrylink.db import create_tables, database_works, make_engine
from ferrylink.events import Event
from ferrylink.login_guard import GuardPolicy, LoginGuard
from ferrylink.messaging import Publisher, Topology
from ferrylink.models import ClusterState
from ferrylink.settings import FerrylinkSettings, redact_url
from ferrylink.telemetry import inject_headers, setup_logging, setup_tracing
from ferrylink.work import LoopWork, WorkFollower

log = logging.getLogger(__name__)

BROKER_CONNECTED = Gauge("ferrylink_broker_connected", "1 when the broker connections are up")
CONSUMERS_ACTIVE = Gauge(
    "ferrylink_consumer_active", "1 when the named consumer is consuming", ["consumer"]
)


class ServiceRuntime:
    """One process's connections and the work it runs on the coordinator's say-so."""

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
        self.follower = WorkFollower(settings.node_id, self.consumers)
        self.config_version = 0
        self._stopping = threading.Event()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_forever, name="heartbeat", daemon=True
        )
        self.subscribe("assignments", self._on_assignment)
        self.subscribe("config", self._on_config_change)

    # -- work units -----------------------------------------------------------------------------

    def subscribe(
        self, exchange: str, handler: Callable[[Delivery], None], prefetch: int = 10
    ) -> None:
        """Receive every broadcast on one of the cluster's fanout exchanges, whenever
        connected (not a work unit: every process of every server listens)."""
        self.consumers.register(
            ConsumerSpec(exchange, "", handler, prefetch=prefetch,
                         exchange=self.topology.exchange(exchange), always=True)
        )  # fmt: skip

    def add_consumer_work(self, spec: ConsumerSpec) -> None:
        """A queue consumer that runs only where the coordinator assigns `spec.name`."""
        self.consumers.register(spec)
        self.follower.consumer_units.add(spec.name)

    def add_loop_work(self, name: str, loop: LoopWork) -> None:
        """A loop (scheduler, folder polling) that runs only where the coordinator assigns it."""
        self.follower.loops[name] = loop

    # -- publishing -----------------------------------------------------------------------------

    def work_queue(self, name: str) -> str:
        """The queue new work of this kind goes to: in passive_legacy each server keeps its
        own (node-local) queue, otherwise the cluster shares one."""
        mode = self.follower.mode or self.settings.cluster_mode
        if mode == "passive_legacy":
            return self.topology.node_queue(name, self.settings.node_id)
        return self.topology.queue(name)

    def publish_event(self, event: Event, timeout: float = 30.0) -> None:
        """Publish an event (confirmed), carrying the current trace context."""
        self.publisher.publish(
            "", self.work_queue("events"), event.to_bytes(), headers=inject_headers(),
            message_id=event.id,
        ).result(timeout)  # fmt: skip

    def announce_config_change(self) -> None:
        """Tell every service that the configuration changed (they re-read the database)."""
        exchange = self.topology.exchange("config")
        self.publisher.publish(exchange, "", b"{}", mandatory=False).result(10)

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        log.info(
            "starting %s on node %s, broker %s",
            self.service_name,
            self.settings.node_id,
            ", ".join(redact_url(u) for u in self.settings.amqp_urls),
        )
        create_tables(self.engine)
        self.config_version = read_config_version(self.engine)
        self.publisher.start()
        self.consumers.start()
        self.follower.start()
        self._fetch_assignment()
        self._heartbeat_thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self.follower.stop()
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

    # -- following the coordinator --------------------------------------------------------------

    def _on_assignment(self, delivery: Delivery) -> None:
        self.follower.offer(Assignment.model_validate_json(delivery.body))

    def _on_config_change(self, delivery: Delivery) -> None:
        # The message only says "something changed"; the database holds the truth.
        self.config_version = read_config_version(self.engine)

    def _fetch_assignment(self) -> None:
        """Read the current assignment from the shared database (where the coordinator
        leader keeps it) so work starts without waiting for the next broadcast."""
        try:
            with Session(self.engine) as session:
                state = session.get(ClusterState, 1)
            if state is not None and state.assignment_json:
                self.follower.offer(Assignment.model_validate_json(state.assignment_json))
        except (SQLAlchemyError, ValueError) as exc:
            log.info("no assignment to start from yet: %s", exc)

    def heartbeat(self) -> Heartbeat:
        return Heartbeat(
            node=self.settings.node_id,
            service=self.service_name,
            pid=os.getpid(),
            sent_at=time.time(),
            epoch=self.follower.epoch,
            active=self.follower.active(),
            config_version=self.config_version,
        )

    def _heartbeat_forever(self) -> None:
        exchange = self.topology.exchange("heartbeats")
        while not self._stopping.is_set():
            if self.publisher.connected:
                # A config message may have been missed while disconnected: re-read the
                # version (one cheap query), so "synchronized" never sticks at a stale value.
                try:
                    self.config_version = read_config_version(self.engine)
                except Exception as exc:
                    log.warning("cannot read the configuration version: %s", exc)
                # Not waited for: a lost heartbeat is replaced by the next one.
                body = self.heartbeat().model_dump_json().encode()
                self.publisher.publish(exchange, "", body, mandatory=False, persistent=False)
            self._stopping.wait(self.settings.heartbeat_interval)


def create_app(
    runtime: ServiceRuntime,
    routers: Sequence[APIRouter] = (),
    description: str = "",
    on_start: Sequence[Callable[[], None]] = (),
    on_stop: Sequence[Callable[[], None]] = (),
    service: Any = None,
    public_routers: Sequence[APIRouter] = (),
) -> FastAPI:
    """The service's FastAPI app (ferrylink.api_app.build_api) with `/healthz`, `/readyz`,
    `/metrics` and `/work`; the runtime (then `on_start`) starts and stops with it.
    `service` is what the routers' service dependency returns."""

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        for start in on_start:
            start()
        try:
            yield
        finally:
            for stop in on_stop:
                stop()
            runtime.stop()

    health = APIRouter(tags=["health"])

    @health.get("/healthz", summary="The process is alive")
    def healthz() -> dict[str, str]:
        return {
            "status": "ok",
            "service": runtime.service_name,
            "node": runtime.settings.node_id,
        }

    @health.get(
        "/readyz",
        summary="Ready when the broker connections and the database work (503 otherwise)",
    )
    def readyz(response: Response) -> dict[str, Any]:
        checks = runtime.readiness()
        ready = all(checks.values())
        if not ready:
            response.status_code = 503
        return {"ready": ready, "checks": checks, "node": runtime.settings.node_id}

    @health.get("/metrics", summary="Prometheus metrics")
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    work_router = APIRouter(tags=["cluster"])

    @work_router.get(
        "/work", summary="The work this service runs, its assignment epoch and activation history"
    )
    def work() -> dict[str, Any]:
        status = runtime.follower.status()
        status["service"] = runtime.service_name
        return status

    app = build_api(
        title=f"Ferrylink {runtime.service_name}",
        description=description,
        engine=runtime.engine,
        service=service,
        routers=[work_router, *routers],
        public_routers=[health, *public_routers],
        lifespan=lifespan,
        login_guard=login_guard_from(runtime.settings),
    )
    app.state.runtime = runtime
    return app


def login_guard_from(settings: FerrylinkSettings) -> LoginGuard:
    return LoginGuard(
        GuardPolicy(
            delay=settings.login_failure_delay,
            max_delay=settings.login_max_delay,
            address_threshold=settings.login_address_threshold,
            account_threshold=settings.login_account_threshold,
            window=settings.login_window_seconds,
            ban_seconds=settings.login_ban_seconds,
        )
    )


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
