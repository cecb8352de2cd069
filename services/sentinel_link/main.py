"""Entry point of the sentinel-link service.

Delivers every transfer leg's state to the external tracking system from the primary.
"""

from fastapi import FastAPI

from ferrylink.cluster import WORK_SENTINEL_LINK
from ferrylink.service import ServiceRuntime, create_app, serve
from ferrylink.work import FlagWork
from services.sentinel_link.settings import Settings

SERVICE_NAME = "sentinel-link"


def app_from(settings: Settings) -> FastAPI:
    runtime = ServiceRuntime(SERVICE_NAME, settings)
    # Primary-only work, switched by the coordinator's assignment. What it does is not built
    # yet (see README, "Status"); the switch and its fencing are.
    runtime.add_loop_work(WORK_SENTINEL_LINK, FlagWork())
    return create_app(runtime, description=__doc__ or "")


def main() -> None:
    settings = Settings()
    serve(app_from(settings), settings, SERVICE_NAME)


if __name__ == "__main__":
    main()
