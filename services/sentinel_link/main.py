"""Entry point of the sentinel-link service.

Delivers every transfer leg's state to the external tracking system from the primary.
"""

from fastapi import FastAPI

from ferrylink.contracts import WORK_SENTINEL_LINK
from ferrylink.runtime import ServiceRuntime, create_app, serve
from ferrylink.work import FlagWork
from services.sentinel_link.settings import Settings

SERVICE_NAME = "sentinel-link"


def build(settings: Settings) -> ServiceRuntime:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    # Primary-only work, switched by the coordinator's assignment. Delivery is not built
    # yet (README, "Status"); the switch and its fencing are.
    runtime.loop(WORK_SENTINEL_LINK, FlagWork())
    return runtime


def app(settings: Settings) -> FastAPI:
    return create_app(build(settings), description=__doc__ or "")


def main() -> None:
    settings = Settings()
    serve(app(settings), settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
