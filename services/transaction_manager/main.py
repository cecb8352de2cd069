"""Entry point of the transaction-manager service.

Consumes the event queue where the coordinator assigns it, runs each arrived file through
its route once, keeps the consolidated transfer log (served by the primary) and the dead
letters, takes streamed uploads, and serves partner sessions through the edges.
"""

from ferrylink import lean_imports

if __name__ == "__main__":  # a service process: libraries load without docstrings
    lean_imports.install()

from fastapi import FastAPI

from ferrylink import secrets_box
from ferrylink.contracts import (
    EVENT,
    WORK_DEAD_LETTERS,
    WORK_DEAD_LETTERS_LOCAL,
    WORK_EVENTS,
    WORK_EVENTS_LOCAL,
    WORK_TRANSFER_LOG,
)
from ferrylink.destinations import DestinationPolicy
from ferrylink.runtime import ServiceRuntime, create_app, prepare_database, serve
from ferrylink.work import FlagWork
from services.transaction_manager.api import TransactionManager, public_routers, routers
from services.transaction_manager.dead_letters import DeadLetterKeeper
from services.transaction_manager.edge_link import EdgeLink, offers_sessions
from services.transaction_manager.handlers import EventHandler
from services.transaction_manager.routing import RouteRunner
from services.transaction_manager.settings import Settings
from services.transaction_manager.transfer_log import TransferLog

SERVICE_NAME = "transaction-manager"


def build(settings: Settings) -> TransactionManager:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    secrets_box.configure(settings.secret_key)
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    transfer_log = TransferLog(runtime.transfer_states(), settings.node_id)
    routes = RouteRunner(runtime.engine, data_dir, transfer_log, settings.node_id,
                         settings.claim_seconds)  # fmt: skip
    events = EventHandler(runtime.engine, settings.node_id, routes, data_dir, runtime.publish,
                          settings.claim_seconds, settings.event_attempts,
                          settings.state_dir.resolve(), settings.workers)  # fmt: skip
    dead_letters = DeadLetterKeeper(runtime.engine, runtime.topology.queue("events"),
                                    runtime.fence)  # fmt: skip
    serves_transfer_log = FlagWork()  # serving GET /transfers is the primary's job

    # What it reacts to.
    workers, batch = settings.workers, settings.event_batch
    if batch > 1:
        # Two threads take batches (one routes while the other waits for the database or the
        # broker; more only contend for the GIL); what runs alone (pushes, scheduled work)
        # runs on the handler's own `workers` threads. Room for a full batch per thread: a
        # thread takes what is prefetched when it is free.
        threads = min(workers, 2)
        prefetch = max(settings.prefetch, batch * threads)
        runtime.consume_batches(WORK_EVENTS, "events", events.handle_batch, EVENT, batch=batch,
                                prefetch=prefetch, workers=threads)  # fmt: skip
        runtime.consume_batches(WORK_EVENTS_LOCAL, "events", events.handle_batch, EVENT,
                                batch=batch, node_local=True, prefetch=prefetch,
                                workers=threads)  # fmt: skip
    else:
        prefetch = settings.prefetch
        runtime.consume(WORK_EVENTS, "events", events.handle, EVENT,
                        prefetch=prefetch, workers=workers)  # fmt: skip
        runtime.consume(WORK_EVENTS_LOCAL, "events", events.handle, EVENT, node_local=True,
                        prefetch=prefetch, workers=workers)  # fmt: skip
    runtime.consume_raw(WORK_DEAD_LETTERS, "events.dead", dead_letters)
    own_queue = runtime.topology.node_queue("events", settings.node_id)
    runtime.consume_raw(WORK_DEAD_LETTERS_LOCAL, "events.dead",
                        DeadLetterKeeper(runtime.engine, own_queue), node_local=True)  # fmt: skip
    runtime.loop(WORK_TRANSFER_LOG, serves_transfer_log)
    runtime.relay_outbox()  # uploads stage their event with RECEIVED (on every server)
    destinations = DestinationPolicy.from_settings(settings.partner_allow, settings.partner_deny)
    return TransactionManager(runtime, data_dir, transfer_log, serves_transfer_log, destinations)


def app_from(settings: Settings) -> FastAPI:
    tm = build(settings)
    # Partner sessions through the edges: this TM dials out to them (edge_link.py) while it
    # runs the event queue.
    follower = tm.runtime.follower
    edge_link = EdgeLink(
        tm, [e for e in settings.edges.split(",") if e.strip()], settings.edge_secret,
        lambda: offers_sessions(follower.status(), set(follower.active()), follower.mode,
                                settings.node_id),
        settings.edge_idle_connections, settings.edge_token_lifetime,
    )  # fmt: skip
    return create_app(tm.runtime, routers, __doc__ or "", service=tm,
                      public_routers=public_routers, on_start=[edge_link.start],
                      on_stop=[edge_link.stop])  # fmt: skip


def main() -> None:
    settings = Settings()
    prepare_database(settings, SERVICE_NAME)
    serve(app_from(settings), settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
