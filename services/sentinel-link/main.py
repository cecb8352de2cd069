"""Entry point of the sentinel-link service.

Delivers every transfer leg's state to the external tracking system.
"""

from ferrylink.service import ServiceRuntime, create_app, serve
from ferrylink.services.sentinel_link.settings import Settings

SERVICE_NAME = "sentinel-link"


def main() -> None:
    settings = Settings()
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    app = create_app(
        runtime, description="Delivers every transfer leg's state to the external tracking system."
    )
    serve(app, settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
