"""Dependencies of the sentinel link's routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from ferrylink.runtime import ServiceRuntime
from services.sentinel_link.link import LinkStore


def get_runtime(request: Request) -> ServiceRuntime:
    runtime: ServiceRuntime = request.app.state.runtime
    return runtime


def get_store(request: Request) -> LinkStore:
    store: LinkStore = request.app.state.link_store
    return store


RuntimeDep = Annotated[ServiceRuntime, Depends(get_runtime)]
StoreDep = Annotated[LinkStore, Depends(get_store)]
