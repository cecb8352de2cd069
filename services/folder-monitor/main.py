"""Entry point of the folder-monitor service.

Watches folders on shared storage and emits file.arrived events.
"""

from ferrylink.service import ServiceRuntime, create_app, serve
from ferrylink.services.folder_monitor.settings import Settings

SERVICE_NAME = "folder-monitor"


def main() -> None:
    settings = Settings()
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    app = create_app(
        runtime, description="Watches folders on shared storage and emits file.arrived events."
    )
    serve(app, settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
