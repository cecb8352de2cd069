"""Entry point of the cluster-coordinator service.

Designates the primary and publishes which work runs where (the assignment).
"""

from fastapi import FastAPI

from ferrylink.contracts import Heartbeat
from ferrylink.runtime import ServiceRuntime, create_app, serve
from services.cluster_coordinator.api import router
from services.cluster_coordinator.coordinator import Coordinator
from services.cluster_coordinator.settings import Settings

SERVICE_NAME = "cluster-coordinator"


def build(settings: Settings) -> tuple[ServiceRuntime, Coordinator]:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    coordinator = Coordinator(runtime, settings)
    # What it reacts to: every service's heartbeat (its own loop runs on every server).
    runtime.broadcast("heartbeats", coordinator.on_heartbeat, Heartbeat, prefetch=100)
    return runtime, coordinator


def app(settings: Settings) -> FastAPI:
    runtime, coordinator = build(settings)
    api = create_app(
        runtime,
        routers=[router],
        description=__doc__ or "",
        on_start=[coordinator.start],
        on_stop=[coordinator.stop],
    )
    api.state.coordinator = coordinator
    return api


def main() -> None:
    settings = Settings()
    serve(app(settings), settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
