"""The partner-facing HTTPS endpoint: upload, download, list and delete files in the
account's home, streamed through to a backend server (nothing is buffered whole here).

Authentication: HTTP Basic (`curl -u name:password`), or a session token from
`POST /session` sent as `Authorization: Bearer TOKEN`, so a client sending many files pays
for one password check only. The token is issued and checked by the backend servers.

- `PUT /files/{path}`: upload (folders are created); 201 `{"path", "bytes", "event_id"}`.
- `GET /files/{path}`: download a file; on a folder (or `/files/`) a JSON listing.
- `DELETE /files/{path}`: delete a file; 204.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.requests import ClientDisconnect

from ferrylink.edge_wire import (
    AUTH_FAILED,
    BAD_REQUEST,
    NO_SUCH_FILE,
    PERMISSION_DENIED,
    QUOTA_EXCEEDED,
    TOO_LARGE,
)
from services.edge_proxy.backends import (
    BackendConnection,
    BackendGone,
    BackendHub,
    BackendRefused,
    LoginBanned,
    NoBackend,
    TooManySessions,
)

log = logging.getLogger(__name__)
READ_CHUNK = 256 * 1024
STATUS = {NO_SUCH_FILE: 404, PERMISSION_DENIED: 403, BAD_REQUEST: 400, AUTH_FAILED: 401,
          TOO_LARGE: 413, QUOTA_EXCEEDED: 507}  # fmt: skip
UNAUTHORIZED_HEADERS = {"WWW-Authenticate": 'Basic realm="ferrylink"'}


def get_hub(request: Request) -> BackendHub:
    hub: BackendHub = request.app.state.hub
    return hub


HubDep = Annotated[BackendHub, Depends(get_hub)]
router = APIRouter()


def _credentials(request: Request) -> dict[str, Any]:
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value:
        return {"token": value.strip()}
    if scheme.lower() == "basic" and value:
        try:
            user, _, password = base64.b64decode(value).decode().partition(":")
        except (binascii.Error, ValueError, UnicodeDecodeError):
            raise HTTPException(401, "malformed Basic credentials", UNAUTHORIZED_HEADERS) from None
        return {"account": user, "password": password}
    raise HTTPException(401, "log in with Basic auth or a Bearer session token",
                        UNAUTHORIZED_HEADERS)  # fmt: skip


@dataclass
class PartnerSession:
    """One HTTPS request's session: a logged-in backend connection, counted per account."""

    hub: BackendHub
    backend: BackendConnection
    account: str

    def end(self) -> None:
        self.hub.leave(self.account)
        self.hub.release(self.backend)


async def _session(request: Request, hub: BackendHub) -> PartnerSession:
    credentials = _credentials(request)
    credentials.update(
        client_address=request.client.host if request.client else "?", protocol="https"
    )
    try:
        backend, answer = await hub.login(credentials, None)
    except NoBackend as exc:
        raise HTTPException(503, str(exc)) from None
    except LoginBanned as exc:
        raise HTTPException(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    if answer is None:
        hub.release(backend)
        raise HTTPException(401, "authentication failed", UNAUTHORIZED_HEADERS)
    account = str(answer["account"])
    try:
        hub.admit(account, answer.get("limits") or {})
    except TooManySessions as exc:
        hub.release(backend)
        raise HTTPException(429, str(exc)) from None
    return PartnerSession(hub, backend, account)


def _http_error(exc: Exception) -> HTTPException:
    if isinstance(exc, BackendRefused):
        return HTTPException(STATUS.get(exc.code, 409), str(exc))
    if isinstance(exc, BackendGone):
        return HTTPException(502, str(exc))
    raise exc


@router.post("/session", tags=["session"], summary="Log in once; returns a Bearer token")
async def create_session(request: Request, hub: HubDep) -> dict[str, Any]:
    session = await _session(request, hub)
    try:
        answer, _ = await session.backend.request({"op": "issue_token"})
    except (BackendRefused, BackendGone) as exc:
        raise _http_error(exc) from None
    finally:
        session.end()
    return {"token": answer["token"], "expires_in": answer["expires_in"]}


@router.put("/files/{path:path}", status_code=201, tags=["files"], summary="Upload (streamed)")
async def upload(path: str, request: Request, hub: HubDep) -> dict[str, Any]:
    session = await _session(request, hub)
    backend = session.backend
    try:
        opened, _ = await backend.request(
            {"op": "open", "path": path, "mode": "write", "make_parents": True}
        )
        handle, offset = opened["handle"], 0
        max_bytes = (opened.get("limit") or {}).get("max_bytes")
        async for chunk in request.stream():
            if chunk:
                await backend.send({"op": "write", "handle": handle, "offset": offset}, chunk)
                offset += len(chunk)
                if max_bytes is not None and offset > max_bytes:
                    break  # the backend refused it too: its close says why (413 / 507)
        answer, _ = await backend.request({"op": "close", "handle": handle})
    except (BackendRefused, BackendGone) as exc:
        raise _http_error(exc) from None
    except ClientDisconnect:
        log.info("HTTPS upload of %s interrupted by the client", path)
        raise HTTPException(400, "the upload was interrupted") from None
    finally:
        session.end()  # an unclosed upload is kept by the backend as a partial
    return {"path": path, "bytes": answer["bytes"], "event_id": answer["event_id"]}


@router.get("/files/{path:path}", tags=["files"], summary="Download a file, or list a folder")
async def download(path: str, request: Request, hub: HubDep) -> Response:
    session = await _session(request, hub)
    backend = session.backend
    try:
        found, _ = await backend.request({"op": "stat", "path": path})
        if found["attrs"]["is_dir"]:
            listing, _ = await backend.request({"op": "list", "path": path})
            session.end()
            return JSONResponse({"path": path, "entries": listing["entries"]})
        opened, _ = await backend.request({"op": "open", "path": path, "mode": "read"})
    except (BackendRefused, BackendGone) as exc:
        session.end()
        raise _http_error(exc) from None
    except BaseException:
        session.end()
        raise

    async def body() -> AsyncIterator[bytes]:
        offset = 0
        try:
            while True:
                _, data = await backend.request(
                    {"op": "read", "handle": opened["handle"], "offset": offset,
                     "size": READ_CHUNK}
                )  # fmt: skip
                if not data:
                    return
                offset += len(data)
                yield data
        finally:
            session.end()

    return StreamingResponse(
        body(), media_type="application/octet-stream",
        headers={"content-length": str(found["attrs"]["size"])},
    )  # fmt: skip


@router.delete("/files/{path:path}", status_code=204, tags=["files"], summary="Delete a file")
async def delete(path: str, request: Request, hub: HubDep) -> Response:
    session = await _session(request, hub)
    try:
        await session.backend.request({"op": "remove", "path": path})
    except (BackendRefused, BackendGone) as exc:
        raise _http_error(exc) from None
    finally:
        session.end()
    return Response(status_code=204)
