"""Entry point of the folder-monitor service.

Watches folders on shared storage and emits `file.arrived` events on the primary: polling
(monitor.py) runs only where the coordinator assigns `folder-monitor.watch`; the watches are
managed through `/watches` (api.py) on any server.
"""

from fastapi import FastAPI

from ferrylink.cluster import WORK_FOLDER_MONITOR
from ferrylink.events import Event
from ferrylink.service import ServiceRuntime, create_app, serve
from ferrylink.telemetry import inject_headers
from services.folder_monitor.api import WatchStore, routers
from services.folder_monitor.monitor import FolderMonitor
from services.folder_monitor.settings import Settings

SERVICE_NAME = "folder-monitor"
PUBLISH_TIMEOUT = 10.0  # bounds how long stop() can wait for a batch


def build(settings: Settings) -> tuple[ServiceRuntime, FolderMonitor]:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)

    def publish(events: list[Event]) -> None:
        # Pipelined: publish the whole batch, then wait for every confirm.
        queue = runtime.work_queue("events")
        futures = [
            runtime.publisher.publish(
                "", queue, event.to_bytes(), headers=inject_headers(), message_id=event.id
            )
            for event in events
        ]
        for future in futures:
            future.result(PUBLISH_TIMEOUT)

    monitor = FolderMonitor(
        runtime.engine, data_dir, publish, interval=settings.folder_poll_interval
    )
    runtime.add_loop_work(WORK_FOLDER_MONITOR, monitor)
    return runtime, monitor


def app_from(settings: Settings) -> FastAPI:
    runtime, monitor = build(settings)
    return create_app(runtime, routers, __doc__ or "", service=WatchStore(monitor.data_dir))


def main() -> None:
    settings = Settings()
    serve(app_from(settings), settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
