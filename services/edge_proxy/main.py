"""Entry point of the edge-proxy service: the partners' front door in the DMZ.

One process, one event loop, four listeners:
- SFTP for partners (`FERRYLINK_SFTP_PORT`, asyncssh; `sftp.py`),
- HTTPS for partners (`FERRYLINK_HTTPS_PORT`; `https_api.py`),
- the tunnel port the backend transaction managers dial out to (`FERRYLINK_TUNNEL_PORT`;
  `backends.py`); the edge never opens a connection into the secure zone,
- its own small HTTP API (`FERRYLINK_HTTP_PORT`): `/healthz`, `/readyz` (200 once a
  backend server is connected), `/metrics`, and `/backends`, which needs the edge secret
  as a bearer token (the edge keeps no administrators; the backends hold the secret).
It keeps no account database, no account keys and no files: logins are checked by the
backend servers and every session streams through to one of them.
"""

from __future__ import annotations

from ferrylink import lean_imports

if __name__ == "__main__":  # a service process: libraries load without docstrings
    lean_imports.install()

import asyncio
import contextlib
import hmac
import logging
import signal
from collections.abc import Generator
from typing import Annotated, Any

import uvicorn
from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest

from ferrylink.error_shape import install_error_handlers
from ferrylink.telemetry import instrument_http, setup_logging, setup_tracing
from services.edge_proxy.backends import BackendHub
from services.edge_proxy.https_api import router as files_router
from services.edge_proxy.keys import ensure_host_key, ensure_tls
from services.edge_proxy.settings import Settings
from services.edge_proxy.sftp import start_sftp

SERVICE_NAME = "edge-proxy"
log = logging.getLogger(__name__)

SESSIONS = Gauge("ferrylink_edge_sessions", "Partner sessions running per backend", ["node"])
IDLE = Gauge("ferrylink_edge_idle_connections", "Idle connections per backend", ["node"])


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to this module (two run in one loop)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


EDGE_BEARER = HTTPBearer(auto_error=False, description="The edge secret (FERRYLINK_EDGE_SECRET)")


def require_edge_secret(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(EDGE_BEARER)],
) -> None:
    """What the backends know: the edge secret, as a bearer token."""
    secret: str = request.app.state.edge_secret
    given = credentials.credentials if credentials is not None else ""
    if not secret or not hmac.compare_digest(given.encode(), secret.encode()):
        raise HTTPException(401, "the edge secret is required as a bearer token",
                            headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


def admin_app(hub: BackendHub, settings: Settings) -> FastAPI:
    app = FastAPI(title="Ferrylink edge-proxy", description=__doc__ or "", version="0.1.0")
    app.state.edge_secret = settings.edge_secret
    install_error_handlers(app)

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok", "service": SERVICE_NAME, "edge": settings.edge_id}

    @app.get("/readyz", tags=["health"], summary="200 once a backend server is connected")
    def readyz(response: Response) -> dict[str, Any]:
        ready = hub.available
        if not ready:
            response.status_code = 503
        return {"ready": ready, "checks": {"backend_connected": ready}, "edge": settings.edge_id}

    @app.get("/backends", tags=["backends"], summary="Connected backend servers",
             dependencies=[Depends(require_edge_secret)])  # fmt: skip
    def backends() -> list[dict[str, Any]]:
        return hub.status()

    @app.get("/metrics", tags=["health"])
    def metrics() -> Response:
        for entry in hub.status():
            SESSIONS.labels(node=entry["node"]).set(entry["sessions"])
            IDLE.labels(node=entry["node"]).set(entry["idle"])
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return app


def partner_app(hub: BackendHub) -> FastAPI:
    app = FastAPI(title="Ferrylink file transfer", description="Partner HTTPS endpoint",
                  version="0.1.0")  # fmt: skip
    app.state.hub = hub
    install_error_handlers(app)
    app.include_router(files_router)
    return app


async def run(settings: Settings, tracing: bool = False) -> None:
    if not settings.edge_secret:
        raise SystemExit("FERRYLINK_EDGE_SECRET is required (the backends present it)")
    hub = BackendHub(settings.edge_id, settings.edge_secret, settings.backend_wait)
    tunnel_port = await hub.start(settings.tunnel_host, settings.tunnel_port)
    host_key = ensure_host_key(settings.keys_dir)
    cert, key = ensure_tls(settings.keys_dir, sorted({settings.listen_host, "127.0.0.1",
                                                      "localhost"}))  # fmt: skip
    ssh = await start_sftp(hub, settings.listen_host, settings.sftp_port, host_key,
                           settings.login_timeout)  # fmt: skip
    common: dict[str, Any] = {"log_config": None, "access_log": False,
                              "timeout_graceful_shutdown": 5}  # fmt: skip
    partners = partner_app(hub)
    if tracing:
        instrument_http(partners)  # every partner request: a SERVER span, its trace's root
    servers = [
        _Server(uvicorn.Config(partners, host=settings.listen_host,
                               port=settings.https_port, ssl_certfile=str(cert),
                               ssl_keyfile=str(key), **common)),
        _Server(uvicorn.Config(admin_app(hub, settings), host=settings.http_host,
                               port=settings.http_port, **common)),
    ]  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(server.serve()) for server in servers]
    log.info(
        "edge %s: SFTP on %s:%s, HTTPS on %s:%s, backends dial %s:%s",
        settings.edge_id, settings.listen_host, settings.sftp_port, settings.listen_host,
        settings.https_port, settings.tunnel_host, tunnel_port,
    )  # fmt: skip
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
    for server in servers:
        server.should_exit = True
    ssh.close()
    await hub.stop()
    await asyncio.gather(*tasks, return_exceptions=True)
    stopper.cancel()


def main() -> None:
    settings = Settings()
    setup_logging(SERVICE_NAME, settings.edge_id, settings.log_level)
    asyncio.run(
        run(settings, setup_tracing(SERVICE_NAME, settings.edge_id, settings.otlp_endpoint))
    )


if __name__ == "__main__":
    main()
