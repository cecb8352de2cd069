"""What every Ferrylink process shares: its runtime (settings, database, broker links, the
work it follows from the coordinator, heartbeats) and an HTTP app with `/healthz`, `/readyz`,
`/metrics` and `/work`.

A service's `main.py` builds one runtime and declares, in one place, what it reacts to:

    runtime.consume(WORK_EVENTS, "events", handler.handle, EVENT)   # a work queue, when assigned
    runtime.consume_batches(WORK_EVENTS, "events", handler.handle_batch, EVENT, batch=64)
    runtime.broadcast("config", on_config, ConfigChanged)           # a fanout, always
    runtime.loop(WORK_SCHEDULER, scheduler)                         # a loop, when assigned
    runtime.publish(message) / runtime.publish_all(messages)        # typed messages out

Handlers take the typed message (parsed from the contract; a bad one is parked with its
reason) and run inside the trace context it carried; a batch handler takes the messages
waiting together, each with its context, and answers per message. Queue names, message ids
and pika stay in here and in messaging.py.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import uvicorn
from fastapi import APIRouter, FastAPI, Response
from opentelemetry import context as otel_context
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import TypeAdapter
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session
from uvicorn.config import STARTUP_FAILURE

from ferrylink import outbox
from ferrylink.api_app import build_api
from ferrylink.config import bump_config_version, read_config_version
from ferrylink.consumer_manager import (
    BATCH_LINGER_SECONDS,
    ConsumerManager,
    ConsumerSpec,
    Delivery,
)
from ferrylink.contracts import (
    Assignment,
    ClusterMode,
    ConfigChanged,
    Contract,
    Heartbeat,
    RejectMessage,
    RetryLater,
    destination,
    message_id,
    parse,
)
from ferrylink.db import database_works, make_engine
from ferrylink.fencing import DatabaseClock, Fence, Fenced
from ferrylink.login_guard import DatabaseGuardStore, GuardPolicy, GuardStore, LoginGuard
from ferrylink.messaging import Publisher, Topology, queue_message_counts, wait_all
from ferrylink.metrics import (
    BROKER_CONNECTED,
    CONFIG_VERSION,
    CONSUMERS_ACTIVE,
    EPOCH,
    MESSAGE_HANDLING_SECONDS,
    MESSAGES_HANDLED,
    PRIMARY,
)
from ferrylink.primary_proxy import register_service_url
from ferrylink.schema import SchemaError, prepare_schema
from ferrylink.settings import FerrylinkSettings, redact_url
from ferrylink.tables.cluster import ClusterState
from ferrylink.tables.outbox import OutboxMessage
from ferrylink.telemetry import (
    consumer_span,
    end_consumer_span,
    extract_context,
    inject_headers,
    instrument_http,
    producer_span,
    setup_logging,
    setup_tracing,
    start_consumer_span,
)
from ferrylink.transfer_states import TransferStatePublisher
from ferrylink.work import LoopWork, WorkFollower

log = logging.getLogger(__name__)


M = TypeVar("M")
Publish = Callable[[Contract], "Future[None]"]


def typed_handler(
    handler: Callable[[M], object], contract: type[M] | TypeAdapter[M], consumer: str = ""
) -> Callable[[Delivery], None]:
    """A consumer callback that parses the contract (RejectMessage parks a bad message)
    and runs the handler inside the trace context the message carried, counting each
    message's outcome and handling time under `consumer`."""
    adapter = contract if isinstance(contract, TypeAdapter) else TypeAdapter(contract)

    def on_delivery(delivery: Delivery) -> None:
        if not consumer:  # a broadcast (heartbeats, assignments): no span, no count
            token = otel_context.attach(extract_context(delivery.headers))
            try:
                handler(parse(adapter, delivery.body))
            finally:
                otel_context.detach(token)
            return
        started = time.perf_counter()
        outcome = "error"
        try:
            with consumer_span(consumer, delivery.headers):
                handler(parse(adapter, delivery.body))
            outcome = "done"
        except RejectMessage:
            outcome = "rejected"
            raise
        except RetryLater:
            outcome = "retry"
            raise
        except Fenced:
            outcome = "fenced"
            raise
        finally:
            if consumer:
                MESSAGES_HANDLED.labels(consumer=consumer, outcome=outcome).inc()
                MESSAGE_HANDLING_SECONDS.labels(consumer=consumer).observe(
                    time.perf_counter() - started
                )

    return on_delivery


@dataclass(frozen=True)
class Received(Generic[M]):
    """One message of a batch, and the trace context to work on it in (its CONSUMER span,
    continuing the trace the message carried): `with telemetry.attached(item.trace)`."""

    message: M
    trace: otel_context.Context


def typed_batch_handler(
    handler: Callable[[Sequence[Received[M]]], Sequence[object]],
    contract: type[M] | TypeAdapter[M],
    consumer: str,
) -> Callable[[Sequence[Delivery]], list[BaseException | None]]:
    """A batch consumer callback: parses each message (a bad one is parked alone), gives the
    handler the good ones with their trace contexts, and returns per message what to
    settle it by (None: done; an exception: as if a single handler had raised it). The
    handler answers per message: an exception, or anything else for done."""
    adapter = contract if isinstance(contract, TypeAdapter) else TypeAdapter(contract)

    def on_deliveries(deliveries: Sequence[Delivery]) -> list[BaseException | None]:
        started = time.perf_counter()
        results: list[BaseException | None] = [None] * len(deliveries)
        spans = []
        items: list[Received[M]] = []
        for i, delivery in enumerate(deliveries):
            span, context = start_consumer_span(consumer, delivery.headers)
            try:
                message = parse(adapter, delivery.body)
            except RejectMessage as exc:
                results[i] = exc
                end_consumer_span(span, exc)
                continue
            spans.append((i, span))
            items.append(Received(message, context))
        answers: Sequence[object] = []
        if items:
            try:
                answers = handler(items)
            except Exception as exc:  # the handler failed as a whole: each message with it
                answers = [exc] * len(items)
        for (i, span), answer in zip(spans, answers, strict=True):
            error = answer if isinstance(answer, BaseException) else None
            results[i] = error
            end_consumer_span(span, error)
        elapsed = time.perf_counter() - started
        for error in results:
            outcome = ("done" if error is None else "rejected" if isinstance(error, RejectMessage)
                       else "retry" if isinstance(error, RetryLater)
                       else "fenced" if isinstance(error, Fenced) else "error")  # fmt: skip
            MESSAGES_HANDLED.labels(consumer=consumer, outcome=outcome).inc()
            MESSAGE_HANDLING_SECONDS.labels(consumer=consumer).observe(elapsed)
        return results

    return on_deliveries


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
        # Grants are on the database's clock; primary-only writes are checked against the
        # database's epoch with the follower's grant (fencing.py).
        self.db_clock = DatabaseClock(self.engine)
        self.follower = WorkFollower(settings.node_id, self.consumers, clock=self.db_clock.bounds,
                                     report_now=self._beat_now)  # fmt: skip
        self.fence = Fence(self.follower.token, self.follower.fenced)
        self._transfer_states: TransferStatePublisher | None = None
        self._outbox_relay: outbox.OutboxRelay | None = None
        # One failed-login defender a process, counting in the shared database: uploads, edge
        # sessions and admin logins of every server add up.
        self.login_guard = login_guard_from(settings, DatabaseGuardStore(self.engine))
        # The configuration version this process has applied; 0 until its first sync (a
        # process that starts or comes back is out of sync until the cluster syncs it).
        self.config_version = 0
        self._config_lock = threading.Lock()
        self._stopping = threading.Event()
        self._heartbeat_thread = threading.Thread(
            target=self._heartbeat_forever, name="heartbeat", daemon=True
        )
        self.broadcast("assignments", self.follower.offer, Assignment)
        self.broadcast("config", self._on_config_change, ConfigChanged)

    # -- what the service reacts to ---------------------------------------------------------

    def consume(
        self,
        unit: str,
        queue: str,
        handler: Callable[[M], object],
        contract: type[M] | TypeAdapter[M],
        *,
        node_local: bool = False,
        prefetch: int = 10,
        workers: int = 1,
    ) -> None:
        """Consume a work queue ("events", or its dead letters "events.dead") wherever the
        coordinator assigns `unit`; `node_local` picks this server's own queue."""
        self.consume_raw(unit, queue, typed_handler(handler, contract, queue),
                         node_local=node_local,
                         prefetch=prefetch, workers=workers)  # fmt: skip

    def consume_batches(
        self,
        unit: str,
        queue: str,
        handler: Callable[[Sequence[Received[M]]], Sequence[object]],
        contract: type[M] | TypeAdapter[M],
        *,
        batch: int,
        node_local: bool = False,
        prefetch: int = 10,
        workers: int = 1,
        linger: float = BATCH_LINGER_SECONDS,
    ) -> None:
        """Like `consume`, with a handler that takes up to `batch` messages that waited
        together (what the consumer had prefetched when a worker became free) and answers
        per message (see `typed_batch_handler`). A worker waits up to `linger` seconds after
        a batch's first message for more of it."""
        self._register(unit, queue, node_local,
                       dict(batch_handler=typed_batch_handler(handler, contract, queue),
                            batch=batch, prefetch=prefetch, workers=workers,
                            linger=linger))  # fmt: skip

    def consume_raw(
        self,
        unit: str,
        queue: str,
        handler: Callable[[Delivery], None],
        *,
        node_local: bool = False,
        prefetch: int = 10,
        workers: int = 1,
    ) -> None:
        """Like `consume`, for messages that are not a contract (dead letters are kept
        whatever their bytes)."""
        self._register(unit, queue, node_local,
                       dict(handler=handler, prefetch=prefetch, workers=workers))  # fmt: skip

    def _register(self, unit: str, queue: str, node_local: bool, spec: dict[str, Any]) -> None:
        base, _, suffix = queue.partition(".")
        name = (
            self.topology.node_queue(base, self.settings.node_id)
            if node_local
            else self.topology.queue(base)
        )
        if suffix == "dead":
            name = self.topology.dead_letter_queue(name)
        self.consumers.register(ConsumerSpec(unit, name, **spec))
        self.follower.consumer_units.add(unit)

    def broadcast(
        self,
        exchange: str,
        handler: Callable[[M], object],
        contract: type[M] | TypeAdapter[M],
        prefetch: int = 10,
    ) -> None:
        """Hear every message on one of the cluster's fanout exchanges, whenever connected
        (every process of every server listens; not a work unit)."""
        self.consumers.register(
            ConsumerSpec(exchange, "", typed_handler(handler, contract), prefetch=prefetch,
                         exchange=self.topology.exchange(exchange), always=True)
        )  # fmt: skip

    def loop(self, unit: str, work: LoopWork) -> None:
        """A loop (scheduler, folder polling) or a permission (FlagWork) that runs only where
        the coordinator assigns `unit`."""
        self.follower.loops[unit] = work

    # -- publishing -----------------------------------------------------------------------------

    @property
    def mode(self) -> ClusterMode:
        return ClusterMode(self.follower.mode or self.settings.cluster_mode)

    def publish(self, message: Contract) -> Future[None]:
        """Publish one message (confirmed when the future resolves), carrying the current
        trace context. Heartbeats and assignments are transient and unrouted ones are fine."""
        kind, name = destination(message)
        if kind == "exchange":
            # Cluster chatter (heartbeats every second): no spans.
            transient = not isinstance(message, ConfigChanged)
            return self.publisher.publish(
                self.topology.exchange(name), "", message.to_bytes(), headers=inject_headers(),
                message_id=message_id(message), mandatory=False, persistent=not transient,
            )  # fmt: skip
        with producer_span(name, message_id(message)) as headers:
            return self.publisher.publish(
                "", self._work_queue(name), message.to_bytes(), headers=headers,
                message_id=message_id(message),
            )  # fmt: skip

    def publish_all(self, messages: Iterable[Contract], timeout: float = 30.0) -> None:
        """Publish pipelined, then wait for every confirm (raises if one is not confirmed)."""
        wait_all([self.publish(m) for m in messages], timeout)

    def stage(self, session: Session, message: Contract) -> OutboxMessage:
        """Add `message` to the caller's transaction (the outbox): committed with its cause,
        then `send` it; if the process dies first, the relay publishes it."""
        _kind, name = destination(message)
        # The PRODUCER span is now: the relay may publish it later, in this trace anyway.
        with producer_span(name, message_id(message)) as headers:
            return outbox.stage(session, self._work_queue(name), message.to_bytes(),
                                message_id(message), headers)  # fmt: skip

    def send(self, rows: Sequence[OutboxMessage], timeout: float = 30.0) -> None:
        """Publish committed outbox rows, wait for the confirms, delete the rows."""
        outbox.send(self.engine, self.publisher, rows, timeout)

    def relay_outbox(self) -> None:
        """Run the outbox relay in this process (a service that stages messages)."""
        self._outbox_relay = outbox.OutboxRelay(
            self.engine, self._relay_rows, lambda: self.publisher.connected
        )

    def _relay_rows(self, rows: list[OutboxMessage]) -> None:
        """Rows left behind: transfer states (bounded queues) through their own publisher,
        the rest through the shared one."""
        states = [r for r in rows if self.topology.bound_of(r.routing_key) is not None]
        others = [r for r in rows if self.topology.bound_of(r.routing_key) is None]
        if states and self._transfer_states is not None:
            self._transfer_states.resend(states)
        if others:
            outbox.send(self.engine, self.publisher, others)

    def transfer_states(self) -> TransferStatePublisher:
        """The publisher of transfer states, on its own connection whose nacks are final:
        the transfer-states queue is bounded, and a full one drops and counts a state
        (never waited for) without slowing the events published here. States go through
        the outbox, and a state nacked while its queue is not full is published again."""
        if self._transfer_states is None:
            publisher = Publisher(
                self.settings.amqp_urls, declare=self.topology.declare,
                name=f"{self.service_name}-states", nacks_are_final=True,
            )  # fmt: skip
            self._transfer_states = TransferStatePublisher(
                publisher, lambda: self._work_queue("transfer-states"), self.engine,
                self.settings.transfer_states_max_length, self.settings.amqp_urls,
            )  # fmt: skip
        return self._transfer_states

    def _work_queue(self, name: str) -> str:
        """The shared work queue, or this server's own in passive_legacy."""
        if self.mode == ClusterMode.PASSIVE_LEGACY:
            return self.topology.node_queue(name, self.settings.node_id)
        return self.topology.queue(name)

    def republish_raw(self, queue: str, body: bytes, message_id: str) -> Future[None]:
        """Put bytes back on a queue by its full name (a dead letter's replay)."""
        return self.publisher.publish("", queue, body, message_id=message_id)

    def announce_config_change(self) -> None:
        """Tell every service that the configuration changed (they re-read the database)."""
        self.publish(ConfigChanged(version=read_config_version(self.engine))).result(10)

    def commit_config_change(self, session: Session) -> int:
        """A configuration change in `session`: bump the version with it, commit, tell every
        service (dynamic synchronization). Returns the new version."""
        version = bump_config_version(session)
        session.commit()
        self.announce_config_change()
        return version

    def request_sync(self, nodes: Sequence[str] = ()) -> int:
        """Make the processes of `nodes` (all when empty) reload the whole configuration
        (a full sync); returns the version they should report."""
        version = read_config_version(self.engine)
        self.publish(ConfigChanged(version=version, full_sync=True, nodes=list(nodes))).result(10)
        return version

    def apply_config(self) -> int:
        """Take the database's configuration and report its version from now on. Services
        read their configuration (routes, accounts, jobs, watches, endpoints) from the
        shared database when they use it, so applying keeps no copy; what it decides is
        whether this process may say it runs the current version."""
        with self._config_lock:
            version = read_config_version(self.engine)
            self.config_version = version
            CONFIG_VERSION.set(version)
            return version

    def queue_depths(self, queues: Sequence[str], node: str | None = None) -> dict[str, int]:
        """Messages waiting in the named work queues (of `node` when given: node-local)."""
        names = {
            q: self.topology.node_queue(q, node) if node else self.topology.queue(q) for q in queues
        }
        counts = queue_message_counts(self.settings.amqp_urls, list(names.values()))
        return {q: counts[name] for q, name in names.items()}

    # -- life cycle -----------------------------------------------------------------------------

    def start(self) -> None:
        log.info(
            "starting %s on node %s, broker %s",
            self.service_name,
            self.settings.node_id,
            ", ".join(redact_url(u) for u in self.settings.amqp_urls),
        )
        # A new database is created; an older or unknown revision raises SchemaError (the
        # service's main checked this already: prepare_database).
        prepare_schema(self.engine, upgrade=self.settings.database_auto_upgrade)
        # config_version stays 0 ("never synchronized") until the first full sync addressed
        # to this process: a server that starts or comes back consumes no events before.
        register_service_url(self.engine, self.settings.node_id, self.service_name,
                             self.settings.api_url)  # fmt: skip
        self.publisher.start()
        if self._transfer_states is not None:
            self._transfer_states.start()
        self.consumers.start()
        self.db_clock.start()
        self.follower.start()
        if self._outbox_relay is not None:
            self._outbox_relay.start()
        self._fetch_assignment()
        self._heartbeat_thread.start()

    def stop(self) -> None:
        self._stopping.set()
        if self._outbox_relay is not None:
            self._outbox_relay.stop()
        self.follower.stop()
        self.db_clock.stop()
        self.consumers.stop()
        self.publisher.close()
        if self._transfer_states is not None:
            self._transfer_states.close()
        self.engine.dispose()

    def readiness(self) -> dict[str, bool]:
        checks = {
            "broker_publisher": self.publisher.connected,
            "broker_consumers": self.consumers.connected,
            "database": database_works(self.engine),
        }
        self._update_gauges()
        return checks

    def _update_gauges(self) -> None:
        """The gauges that follow this process's state (every heartbeat, and on /readyz)."""
        BROKER_CONNECTED.set(1 if self.publisher.connected and self.consumers.connected else 0)
        status = self.follower.status()
        if status["epoch"] is not None:
            EPOCH.set(status["epoch"])
        PRIMARY.set(1 if status["primary"] == self.settings.node_id else 0)

    def _on_consumers_changed(self, active: set[str]) -> None:
        for name in self.consumers.registered():
            CONSUMERS_ACTIVE.labels(consumer=name).set(1 if name in active else 0)

    # -- following the coordinator --------------------------------------------------------------

    def _on_config_change(self, change: ConfigChanged) -> None:
        # The database holds the truth; the message says when to look. A process that was
        # never synchronized (or fell behind) waits for a full sync addressed to it.
        if change.full_sync:
            if change.addressed_to(self.settings.node_id):
                log.info("full sync: reloading the configuration (version %s)", change.version)
                self.apply_config()
        elif self.config_version > 0:
            self.apply_config()

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
            api_url=self.settings.api_url,
        )

    def _beat_now(self) -> None:
        if self.publisher.connected:
            self.publish(self.heartbeat())

    def _heartbeat_forever(self) -> None:
        while not self._stopping.is_set():
            self._update_gauges()
            if self.publisher.connected:
                # The version reported is the one applied: a change missed while cut off
                # shows this process out of sync until a full sync reloads it. Not waited
                # for: a lost heartbeat is replaced by the next one.
                self.publish(self.heartbeat())
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
        login_guard=runtime.login_guard,
        idempotency_ttl=runtime.settings.idempotency_key_hours * 3600,
    )
    app.state.runtime = runtime
    app.state.commit_config_change = runtime.commit_config_change
    return app


def login_guard_from(settings: FerrylinkSettings, store: GuardStore | None = None) -> LoginGuard:
    return LoginGuard(
        store=store,
        policy=GuardPolicy(
            delay=settings.login_failure_delay,
            max_delay=settings.login_max_delay,
            address_threshold=settings.login_address_threshold,
            account_threshold=settings.login_account_threshold,
            window=settings.login_window_seconds,
            ban_seconds=settings.login_ban_seconds,
        ),
    )


# A service that refuses the database's schema exits with this code (sysexits' EX_CONFIG).
SCHEMA_EXIT_CODE = 78


def prepare_database(settings: FerrylinkSettings, service_name: str) -> None:
    """What a service's main does before it builds anything: make the database usable
    (ferrylink.schema.prepare_schema: create a new one, upgrade an older one only with
    FERRYLINK_DATABASE_AUTO_UPGRADE) or exit with the reason and SCHEMA_EXIT_CODE."""
    setup_logging(service_name, settings.node_id, settings.log_level)
    engine = make_engine(settings.effective_database_url)
    try:
        prepare_schema(engine, upgrade=settings.database_auto_upgrade)
    except SchemaError as exc:
        log.critical("%s refuses to start: %s", service_name, exc)
        raise SystemExit(SCHEMA_EXIT_CODE) from None
    finally:
        engine.dispose()


def serve(app: FastAPI, settings: FerrylinkSettings, service_name: str) -> None:
    """Run the app on uvicorn in the foreground until SIGINT/SIGTERM."""
    setup_logging(service_name, settings.node_id, settings.log_level)
    if setup_tracing(service_name, settings.node_id, settings.otlp_endpoint):
        instrument_http(app)
    # What uvicorn.run does, without importing uvicorn's command line (lean_imports).
    config = uvicorn.Config(
        app,
        host=settings.http_host,
        port=settings.http_port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    if not server.started:
        sys.exit(STARTUP_FAILURE)
