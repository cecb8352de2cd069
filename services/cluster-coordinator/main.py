"""Entry point of the cluster-coordinator service: Designates the primary and publishes which consumers run where."""

from ferrylink.service import ServiceRuntime, create_app, serve
from ferrylink.services.cluster_coordinator.settings import Settings

SERVICE_NAME = "cluster-coordinator"


def main() -> None:
    settings = Settings()
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    app = create_app(
        runtime, description="Designates the primary and publishes which consumers run where."
    )
    serve(app, settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
