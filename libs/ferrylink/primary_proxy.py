"""One entry point: a request only the primary can serve, sent to another server, is
forwarded to the same service on the primary (found in the `service_url` table, which each
service writes at start) and its answer returned as is, instead of a 409.

The caller's Authorization travels with it (tokens are valid on every server); a forwarded
request carries `X-Ferrylink-Forwarded`, and is never forwarded again (no loops while the
primary changes: the caller gets a 503 and retries)."""

from __future__ import annotations

import logging

from fastapi import HTTPException, Request, Response
from sqlalchemy.engine import Engine
from sqlmodel import Session

from ferrylink.clock import utcnow
from ferrylink.tables.cluster import ServiceUrl

log = logging.getLogger(__name__)

FORWARDED = "x-ferrylink-forwarded"
PASSED_REQUEST_HEADERS = ("authorization", "accept", "content-type")
PASSED_RESPONSE_HEADERS = ("content-type", "location", "retry-after", "www-authenticate")
TIMEOUT_SECONDS, CONNECT_TIMEOUT_SECONDS = 30.0, 5.0


def register_service_url(engine: Engine, node_id: str, service: str, url: str) -> None:
    with Session(engine) as session:
        session.merge(ServiceUrl(node_id=node_id, service=service, url=url, updated_at=utcnow()))
        session.commit()


def service_url(engine: Engine, node_id: str, service: str) -> str | None:
    with Session(engine) as session:
        row = session.get(ServiceUrl, (node_id, service))
        return row.url if row else None


def forward_to_primary(
    request: Request, engine: Engine, primary: str | None, node_id: str, service: str
) -> Response:
    """The primary's answer to `request` (blocking: call it from a sync endpoint)."""
    # Imported on first use: httpx (~2 MB with what it pulls in) is not needed by a service
    # that never forwards.
    import httpx

    if primary is None or primary == node_id or request.headers.get(FORWARDED):
        raise HTTPException(
            503,
            f"the primary ({primary or 'none yet'}) is not serving this yet; retry shortly",
            headers={"Retry-After": "2"},
        )
    base = service_url(engine, primary, service)
    if not base:
        raise HTTPException(503, f"the primary {primary} has not published its {service} URL")
    headers = {k: v for k, v in request.headers.items() if k.lower() in PASSED_REQUEST_HEADERS}
    headers[FORWARDED] = node_id
    client_host = request.client.host if request.client else "unknown"
    headers["x-forwarded-for"] = client_host
    try:
        answer = httpx.request(
            request.method,
            f"{base}{request.url.path}",
            params=list(request.query_params.multi_items()),
            headers=headers,
            timeout=httpx.Timeout(TIMEOUT_SECONDS, connect=CONNECT_TIMEOUT_SECONDS),
        )
    except httpx.HTTPError as exc:
        log.warning("forwarding %s %s to %s failed: %s", request.method, request.url.path,
                    primary, exc)  # fmt: skip
        raise HTTPException(502, f"the primary {primary} did not answer: {exc}") from exc
    kept = {k: v for k, v in answer.headers.items() if k.lower() in PASSED_RESPONSE_HEADERS}
    kept["x-ferrylink-served-by"] = primary
    return Response(answer.content, status_code=answer.status_code, headers=kept)
