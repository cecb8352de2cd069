"""Entry point of the cluster-coordinator service.

Designates the primary and publishes which work runs where (the assignment).
"""

from fastapi import FastAPI

from ferrylink.service import ServiceRuntime, create_app, serve
from services.cluster_coordinator.api import routers
from services.cluster_coordinator.coordinator import Coordinator
from services.cluster_coordinator.settings import Settings

SERVICE_NAME = "cluster-coordinator"


def app_from(settings: Settings) -> FastAPI:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    coordinator = Coordinator(runtime, settings)
    return create_app(
        runtime,
        routers=routers,
        description=__doc__ or "",
        on_start=[coordinator.start],
        on_stop=[coordinator.stop],
        service=coordinator,
    )


def main() -> None:
    settings = Settings()
    serve(app_from(settings), settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
