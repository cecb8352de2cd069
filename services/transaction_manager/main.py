"""Entry point of the transaction-manager service.

Consumes the event queue where the coordinator assigns it, runs each arrived file through
its route once, keeps the consolidated transfer log (served by the primary) and the dead
letters, and takes streamed uploads.
"""

from ferrylink.cluster import (
    WORK_DEAD_LETTERS,
    WORK_EVENTS,
    WORK_EVENTS_LOCAL,
    WORK_TRANSFER_LOG,
)
from ferrylink.consumer_manager import ConsumerSpec
from ferrylink.service import ServiceRuntime, create_app, serve
from ferrylink.work import FlagWork
from services.transaction_manager.api import TransactionManager, router
from services.transaction_manager.dead_letters import DeadLetterKeeper
from services.transaction_manager.handlers import EventHandler
from services.transaction_manager.outbox import OutboxRelay
from services.transaction_manager.routing import RouteRunner
from services.transaction_manager.settings import Settings
from services.transaction_manager.transfer_log import TransferLog

SERVICE_NAME = "transaction-manager"


def build(settings: Settings) -> TransactionManager:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    topology = runtime.topology
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    transfer_log = TransferLog(
        runtime.publisher, lambda: runtime.work_queue("transfer-states"), settings.node_id
    )
    routes = RouteRunner(runtime.engine, data_dir, transfer_log, settings.node_id,
                         settings.claim_seconds)  # fmt: skip
    handler = EventHandler(runtime.engine, settings.node_id, routes, data_dir,
                           runtime.publish_event, settings.claim_seconds,
                           settings.event_attempts)  # fmt: skip
    for unit, queue in (
        (WORK_EVENTS, topology.queue("events")),
        (WORK_EVENTS_LOCAL, topology.node_queue("events", settings.node_id)),
    ):
        runtime.add_consumer_work(
            ConsumerSpec(
                unit, queue, handler, prefetch=settings.prefetch, workers=settings.workers
            )  # fmt: skip
        )
    runtime.add_consumer_work(
        ConsumerSpec(
            WORK_DEAD_LETTERS,
            topology.dead_letter_queue(topology.queue("events")),
            DeadLetterKeeper(runtime.engine, topology.queue("events")),
        )  # fmt: skip
    )
    serves_transfer_log = FlagWork()  # serving GET /transfers is the primary's job
    runtime.add_loop_work(WORK_TRANSFER_LOG, serves_transfer_log)
    return TransactionManager(runtime, data_dir, transfer_log, serves_transfer_log)


def main() -> None:
    settings = Settings()
    tm = build(settings)
    relay = OutboxRelay(tm.runtime.engine, tm.runtime.publisher)
    app = create_app(tm.runtime, routers=[router], description=__doc__ or "",
                     on_start=[relay.start], on_stop=[relay.stop])  # fmt: skip
    app.state.tm = tm
    serve(app, settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
