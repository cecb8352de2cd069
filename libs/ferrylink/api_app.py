"""The FastAPI app every service serves, built in one place so what must hold for every
route (authentication, one error shape, body limits) cannot be forgotten by a service.

`routers` are the service's own resources, all behind the administrator token
(ferrylink.admin_auth); `public_routers` hold endpoints that authenticate someone else
themselves (accounts uploading files) or need no authentication (health), and must say so.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI
from sqlalchemy.engine import Engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ferrylink import admin_api, audit_api
from ferrylink.admin_auth import require_admin_token
from ferrylink.config import bump_config_version
from ferrylink.error_shape import error_response, install_error_handlers
from ferrylink.idempotency import DEFAULT_TTL, Idempotency
from ferrylink.login_guard import LoginGuard

MAX_BODY_BYTES = 1 << 20

log = logging.getLogger(__name__)

Lifespan = Callable[[FastAPI], AbstractAsyncContextManager[None]]


class BodyLimit:
    """Refuse request bodies over `limit` bytes with 413, by Content-Length up front or by
    reading a chunked body up to the limit first (ASGI middleware: it sees every route)."""

    def __init__(self, app: ASGIApp, limit: int, unlimited_prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.limit = limit
        self.unlimited_prefixes = unlimited_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"].startswith(self.unlimited_prefixes):
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._refuse(scope, receive, send)
            return
        # No length declared (chunked): read it here, at most `limit` bytes, then replay.
        chunks: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            chunks.append(message)
            seen += len(message.get("body", b""))
            if seen > self.limit:
                await self._refuse(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return chunks.pop(0) if chunks else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"the request body is over the limit of {self.limit} bytes")
        await response(scope, receive, send)


def _commit_config_change(session: Any) -> int:
    version = bump_config_version(session)
    session.commit()
    return version


def build_api(
    *,
    title: str,
    engine: Engine,
    service: Any = None,
    routers: Sequence[APIRouter] = (),
    public_routers: Sequence[APIRouter] = (),
    description: str = "",
    lifespan: Lifespan | None = None,
    login_guard: LoginGuard | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    idempotency_ttl: float = DEFAULT_TTL,
) -> FastAPI:
    app = FastAPI(title=title, description=description, version="0.1.0", lifespan=lifespan)
    # Read by the dependencies in ferrylink.deps (and only there).
    app.state.engine = engine
    app.state.service = service
    app.state.login_guard = login_guard or LoginGuard()
    # How a configuration change is committed (ferrylink.deps.ConfigChangeDep): bumped and
    # committed here; a service's runtime also announces it to every process.
    app.state.commit_config_change = _commit_config_change
    install_error_handlers(app)
    # Uploads stream their bodies to disk; every other body is small JSON.
    unlimited = tuple(r.prefix + "/" for r in public_routers if r.prefix)
    # Inside the body limit (added last = outermost): retried creates and uploads act once.
    app.add_middleware(
        Idempotency, engine=lambda: app.state.engine, error=error_response, ttl=idempotency_ttl
    )
    app.add_middleware(BodyLimit, limit=max_body_bytes, unlimited_prefixes=unlimited)
    # Every router a service registers is behind the admin token: one dependency, declared
    # in the OpenAPI document as the AdminToken scheme.
    protected = [Depends(require_admin_token)]
    for router in [admin_api.router, audit_api.router, *routers]:
        app.include_router(router, dependencies=protected)
    for router in [admin_api.login_router, *public_routers]:
        app.include_router(router)
    return app
