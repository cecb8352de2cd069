"""Entry point of the scheduler service.

Runs scheduled transfers and maintenance applications on the primary: APScheduler
(runner.py) runs where the coordinator assigns `scheduler.jobs` and submits each fire time
as an event to the event queue, which spreads the work over the transaction managers. The
jobs are managed through `/jobs` (api.py) on any server.
"""

from ferrylink import lean_imports

if __name__ == "__main__":  # a service process: libraries load without docstrings
    lean_imports.install()

import logging

from fastapi import FastAPI

from ferrylink.contracts import WORK_SCHEDULER
from ferrylink.runtime import ServiceRuntime, create_app, prepare_database, serve
from services.scheduler.api import JobStore, routers
from services.scheduler.defaults import seed_default_jobs
from services.scheduler.runner import JobScheduler
from services.scheduler.settings import Settings

SERVICE_NAME = "scheduler"
PUBLISH_TIMEOUT = 10.0  # bounds how long a run's publish (and so stop()) can wait

log = logging.getLogger(__name__)


def build(settings: Settings) -> tuple[ServiceRuntime, JobScheduler]:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    scheduler = JobScheduler(
        runtime.engine,
        settings.node_id,
        lambda event: runtime.publish(event).result(PUBLISH_TIMEOUT),
        sync_interval=settings.scheduler_sync_interval,
        fence=runtime.fence,
    )
    # What it does: a loop, on the primary only.
    runtime.loop(WORK_SCHEDULER, scheduler)
    return runtime, scheduler


def app_from(settings: Settings) -> FastAPI:
    runtime, _scheduler = build(settings)
    store = JobStore(settings.data_dir.resolve(), settings.scheduler_misfire_grace)

    def default_jobs() -> None:
        if not settings.scheduler_default_jobs:
            return
        try:
            if seed_default_jobs(runtime.engine, settings.scheduler_misfire_grace):
                runtime.announce_config_change()
        except Exception:  # the next start tries again; the service runs without them
            log.exception("could not create the default maintenance jobs")

    return create_app(runtime, routers, __doc__ or "", service=store, on_start=[default_jobs])


def main() -> None:
    settings = Settings()
    prepare_database(settings, SERVICE_NAME)
    serve(app_from(settings), settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
