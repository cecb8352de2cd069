"""Entry point of the cluster-coordinator service.

Designates the primary and publishes which work runs where (the assignment).
"""

from fastapi import FastAPI

from ferrylink.contracts import Heartbeat
from ferrylink.runtime import ServiceRuntime, create_app, serve
from services.cluster_coordinator.api import routers
from services.cluster_coordinator.coordinator import Coordinator
from services.cluster_coordinator.settings import Settings

SERVICE_NAME = "cluster-coordinator"


def build(settings: Settings) -> tuple[ServiceRuntime, Coordinator]:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    coordinator = Coordinator(runtime, settings)
    # What it reacts to: every service's heartbeat (its own loop runs on every server).
    runtime.broadcast("heartbeats", coordinator.on_heartbeat, Heartbeat, prefetch=100)
    return runtime, coordinator


def app_from(settings: Settings) -> FastAPI:
    runtime, coordinator = build(settings)
    return create_app(runtime, routers, __doc__ or "", service=coordinator,
                      on_start=[coordinator.start], on_stop=[coordinator.stop])  # fmt: skip


def main() -> None:
    settings = Settings()
    serve(app_from(settings), settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
