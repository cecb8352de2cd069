"""Entry point of the cluster-coordinator service.

Designates the primary and publishes which work runs where (the assignment).
"""

from ferrylink import lean_imports

if __name__ == "__main__":  # a service process: libraries load without docstrings
    lean_imports.install()

from fastapi import FastAPI

from ferrylink.contracts import Heartbeat
from ferrylink.runtime import ServiceRuntime, create_app, prepare_database, serve
from services.cluster_coordinator.api import routers
from services.cluster_coordinator.coordinator import Coordinator
from services.cluster_coordinator.settings import Settings
from services.cluster_coordinator.web import pages as web

SERVICE_NAME = "cluster-coordinator"


def build(settings: Settings) -> tuple[ServiceRuntime, Coordinator]:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    coordinator = Coordinator(runtime, settings)
    # What it reacts to: every service's heartbeat (its own loop runs on every server).
    runtime.broadcast("heartbeats", coordinator.on_heartbeat, Heartbeat, prefetch=100)
    return runtime, coordinator


def app_from(settings: Settings) -> FastAPI:
    runtime, coordinator = build(settings)
    # The web UI checks its own session cookie (web/session.py), hence a public router.
    app = create_app(runtime, routers, __doc__ or "", service=coordinator,
                     public_routers=[web.router],
                     on_start=[coordinator.start], on_stop=[coordinator.stop])  # fmt: skip
    web.install(app)
    return app


def main() -> None:
    settings = Settings()
    prepare_database(settings, SERVICE_NAME)
    serve(app_from(settings), settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
