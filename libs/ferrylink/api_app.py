"""The FastAPI app every service serves, built in one place so what must hold for every
route (authentication, one error shape, body limits) cannot be forgotten by a service.

`routers` are the service's own resources; `public_routers` hold endpoints that
authenticate someone else themselves (accounts uploading files) and must say so.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import APIRouter, FastAPI
from sqlalchemy.engine import Engine

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


def build_api(
    *,
    title: str,
    engine: Engine,
    service: Any = None,
    routers: Sequence[APIRouter] = (),
    public_routers: Sequence[APIRouter] = (),
    description: str = "",
    lifespan: Lifespan | None = None,
) -> FastAPI:
    app = FastAPI(title=title, description=description, version="0.1.0", lifespan=lifespan)
    # Read by the dependencies in ferrylink.deps (and only there).
    app.state.engine = engine
    app.state.service = service
    for router in routers:
        app.include_router(router)
    for router in public_routers:
        app.include_router(router)
    return app
