"""Entry point of the transaction-manager service.

Consumes the event queue where the coordinator assigns it and completes each event once.
"""

from ferrylink.cluster import WORK_EVENTS, WORK_EVENTS_LOCAL, WORK_TRANSFER_LOG
from ferrylink.consumer_manager import ConsumerSpec
from ferrylink.service import ServiceRuntime, create_app, serve
from ferrylink.services.transaction_manager.handlers import EventHandler
from ferrylink.services.transaction_manager.settings import Settings
from ferrylink.work import FlagWork

SERVICE_NAME = "transaction-manager"


def build_runtime(settings: Settings) -> ServiceRuntime:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    handler = EventHandler(runtime.engine, settings.node_id)
    runtime.add_consumer_work(
        ConsumerSpec(
            WORK_EVENTS,
            runtime.topology.queue("events"),
            handler,
            prefetch=settings.prefetch,
            workers=settings.workers,
        )
    )
    runtime.add_consumer_work(
        ConsumerSpec(
            WORK_EVENTS_LOCAL,
            runtime.topology.node_queue("events", settings.node_id),
            handler,
            prefetch=settings.prefetch,
            workers=settings.workers,
        )
    )
    # Serving the consolidated transfer log is the primary's job.
    runtime.add_loop_work(WORK_TRANSFER_LOG, FlagWork())
    return runtime


def main() -> None:
    settings = Settings()
    runtime = build_runtime(settings)
    app = create_app(runtime, description=__doc__ or "")
    serve(app, settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
