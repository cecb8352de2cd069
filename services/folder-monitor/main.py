"""Entry point of the folder-monitor service.

Watches folders on shared storage and emits file.arrived events on the primary.
"""

from ferrylink.cluster import WORK_FOLDER_MONITOR
from ferrylink.service import ServiceRuntime, create_app, serve
from ferrylink.services.folder_monitor.settings import Settings
from ferrylink.work import FlagWork

SERVICE_NAME = "folder-monitor"


def main() -> None:
    settings = Settings()
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    # Primary-only work, switched by the coordinator's assignment. What it does is not built
    # yet (see README, "Status"); the switch and its fencing are.
    runtime.add_loop_work(WORK_FOLDER_MONITOR, FlagWork())
    app = create_app(runtime, description=__doc__ or "")
    serve(app, settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
