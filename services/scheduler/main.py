"""Entry point of the scheduler service.

Runs scheduled transfers and maintenance applications on the primary.
"""

from ferrylink.cluster import WORK_SCHEDULER
from ferrylink.service import ServiceRuntime, create_app, serve
from ferrylink.services.scheduler.settings import Settings
from ferrylink.work import FlagWork

SERVICE_NAME = "scheduler"


def main() -> None:
    settings = Settings()
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    # Primary-only work, switched by the coordinator's assignment. What it does is not built
    # yet (see README, "Status"); the switch and its fencing are.
    runtime.add_loop_work(WORK_SCHEDULER, FlagWork())
    app = create_app(runtime, description=__doc__ or "")
    serve(app, settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
