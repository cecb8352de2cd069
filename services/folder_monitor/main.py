"""Entry point of the folder-monitor service.

Watches folders on shared storage and emits `file.arrived` events on the primary: polling
(monitor.py) runs only where the coordinator assigns `folder-monitor.watch`; the watches are
managed through `/watches` (api.py) on any server.
"""

from ferrylink import lean_imports

if __name__ == "__main__":  # a service process: libraries load without docstrings
    lean_imports.install()

from fastapi import FastAPI

from ferrylink.contracts import WORK_FOLDER_MONITOR
from ferrylink.runtime import ServiceRuntime, create_app, prepare_database, serve
from services.folder_monitor.api import WatchStore, routers
from services.folder_monitor.monitor import FolderMonitor
from services.folder_monitor.settings import Settings

SERVICE_NAME = "folder-monitor"
PUBLISH_TIMEOUT = 10.0  # bounds how long stop() can wait for a batch


def build(settings: Settings) -> tuple[ServiceRuntime, FolderMonitor]:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    data_dir = settings.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    monitor = FolderMonitor(
        runtime.engine,
        data_dir,
        lambda events: runtime.publish_all(events, PUBLISH_TIMEOUT),
        interval=settings.folder_poll_interval,
        fence=runtime.fence,
    )
    # What it does: a polling loop, on the primary only.
    runtime.loop(WORK_FOLDER_MONITOR, monitor)
    return runtime, monitor


def app_from(settings: Settings) -> FastAPI:
    runtime, monitor = build(settings)
    return create_app(runtime, routers, __doc__ or "", service=WatchStore(monitor.data_dir))


def main() -> None:
    settings = Settings()
    prepare_database(settings, SERVICE_NAME)
    serve(app_from(settings), settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
