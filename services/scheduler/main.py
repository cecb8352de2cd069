"""Entry point of the scheduler service.

Runs scheduled transfers and maintenance applications on the primary.
"""

from ferrylink.service import ServiceRuntime, create_app, serve
from ferrylink.services.scheduler.settings import Settings

SERVICE_NAME = "scheduler"


def main() -> None:
    settings = Settings()
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    app = create_app(
        runtime, description="Runs scheduled transfers and maintenance applications on the primary."
    )
    serve(app, settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
