"""`/endpoints`: the tracking systems transfer states are delivered to, managed at run time.

Any server answers (endpoints live in the shared database and are announced like other
configuration); only the primary delivers. The URL is hostile input: http or https only, a
host, no credentials in it (they would end up in logs), no control characters; redirects
are never followed when delivering.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field, field_validator
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from ferrylink.audit import AuditDep
from ferrylink.deps import ConfigChangeDep, SessionDep
from ferrylink.paging import Page, PagingDep, page_from_list
from ferrylink.tables.sentinel import SentinelEndpoint
from services.sentinel_link.api.deps import StoreDep

router = APIRouter(prefix="/endpoints", tags=["endpoints"])


def check_url(value: str) -> str:
    if any(ord(c) < 0x21 or ord(c) == 0x7F for c in value):
        raise ValueError("the URL may not contain spaces or control characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError as exc:
        raise ValueError(f"not a URL: {exc}") from exc
    if parts.scheme not in ("http", "https"):
        raise ValueError("the URL scheme must be http or https")
    if not parts.hostname:
        raise ValueError("the URL needs a host")
    if parts.username is not None or parts.password is not None:
        raise ValueError("no credentials in the URL (they would be logged)")
    if parts.fragment:
        raise ValueError("the URL may not have a fragment")
    return value


class EndpointIn(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    url: str = Field(min_length=1, max_length=2048, examples=["https://tracking.example/in"])
    batch_size: int = Field(100, ge=1, le=10_000, description="Records per POST, at most.")
    max_backlog: int = Field(
        100_000, ge=1, description="Records kept while it is down; past it the oldest drop."
    )
    max_age_seconds: float = Field(
        7 * 86400.0, gt=0, description="Records older than this are dropped (and counted)."
    )
    paused: bool = False

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return check_url(value)


class EndpointPatch(BaseModel):
    """What an update may change; absent fields stay as they are. The name stays."""

    url: str | None = Field(None, min_length=1, max_length=2048)
    batch_size: int | None = Field(None, ge=1, le=10_000)
    max_backlog: int | None = Field(None, ge=1)
    max_age_seconds: float | None = Field(None, gt=0)
    paused: bool | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        return check_url(value) if value is not None else None


class EndpointOut(BaseModel):
    name: str
    url: str
    paused: bool
    batch_size: int
    max_backlog: int
    max_age_seconds: float
    created_at: datetime
    backlog: int = Field(description="Records waiting for delivery.")
    delivered: int
    dropped: int = Field(description="Records dropped by the backlog bounds (oldest first).")
    failures: int = Field(description="Failed deliveries in a row.")
    last_success_at: float | None
    last_error: str | None
    last_error_at: float | None


def _out(endpoint: SentinelEndpoint, status: dict[str, Any] | None) -> EndpointOut:
    status = status or {
        "backlog": 0, "delivered": 0, "dropped": 0, "failures": 0, "last_success_at": None,
        "last_error": None, "last_error_at": None,
    }  # fmt: skip
    return EndpointOut(**endpoint.model_dump(exclude={"id"}), **status)


def _get(session: SessionDep, name: str) -> SentinelEndpoint:
    endpoint = session.exec(select(SentinelEndpoint).where(SentinelEndpoint.name == name)).first()
    if endpoint is None:
        raise HTTPException(404, f"no endpoint {name!r}")
    return endpoint


@router.get("", response_model=Page[EndpointOut], summary="Endpoints with backlog and status")
def list_endpoints(session: SessionDep, store: StoreDep, paging: PagingDep) -> Page[EndpointOut]:
    status = store.status()
    rows = session.exec(select(SentinelEndpoint).order_by(col(SentinelEndpoint.id))).all()
    return page_from_list([_out(e, status.get(e.id or 0)) for e in rows], paging)


@router.get("/{name}", response_model=EndpointOut, summary="One endpoint")
def get_endpoint(name: str, session: SessionDep, store: StoreDep) -> EndpointOut:
    endpoint = _get(session, name)
    return _out(endpoint, store.status().get(endpoint.id or 0))


@router.post("", response_model=EndpointOut, status_code=201, summary="Add an endpoint")
def create_endpoint(
    body: EndpointIn,
    session: SessionDep,
    commit: ConfigChangeDep,
    audit: AuditDep,
    response: Response,
) -> EndpointOut:
    endpoint = SentinelEndpoint(**body.model_dump())
    session.add(endpoint)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise HTTPException(409, f"endpoint {body.name!r} exists") from exc
    audit.record(session, "endpoint.create", body.name, after=endpoint)
    commit(session)
    session.refresh(endpoint)
    response.headers["Location"] = f"{router.prefix}/{endpoint.name}"
    return _out(endpoint, None)


@router.patch("/{name}", response_model=EndpointOut, summary="Change an endpoint")
def update_endpoint(
    name: str, body: EndpointPatch, session: SessionDep, commit: ConfigChangeDep, store: StoreDep,
    audit: AuditDep,
) -> EndpointOut:  # fmt: skip
    endpoint = _get(session, name)
    before = endpoint.model_dump(mode="json")
    change = body.model_dump(exclude_unset=True)
    if any(value is None for value in change.values()):
        raise HTTPException(422, "a field given may not be null; leave it out to keep it")
    for key, value in change.items():
        setattr(endpoint, key, value)
    session.add(endpoint)
    audit.record(session, "endpoint.update", name, before, endpoint)
    commit(session)
    session.refresh(endpoint)
    return _out(endpoint, store.status().get(endpoint.id or 0))


@router.delete("/{name}", status_code=204, summary="Remove an endpoint and its backlog")
def delete_endpoint(
    name: str, session: SessionDep, commit: ConfigChangeDep, store: StoreDep, audit: AuditDep
) -> Response:
    endpoint = _get(session, name)
    endpoint_id = endpoint.id or 0
    audit.record(session, "endpoint.delete", name, before=endpoint)
    session.delete(endpoint)
    commit(session)
    store.forget_endpoint(endpoint_id)
    return Response(status_code=204)


def _set_paused(name: str, paused: bool, session: SessionDep, commit: ConfigChangeDep,
                store: StoreDep, audit: AuditDep) -> EndpointOut:  # fmt: skip
    endpoint = _get(session, name)
    before = endpoint.model_dump(mode="json")
    endpoint.paused = paused
    session.add(endpoint)
    audit.record(session, "endpoint.pause" if paused else "endpoint.resume", name, before,
                 endpoint)  # fmt: skip
    commit(session)
    session.refresh(endpoint)
    return _out(endpoint, store.status().get(endpoint.id or 0))


@router.post("/{name}/pause", response_model=EndpointOut,
             summary="Stop delivering; records keep queueing (within its bounds)")  # fmt: skip
def pause_endpoint(name: str, session: SessionDep, commit: ConfigChangeDep,
                   store: StoreDep, audit: AuditDep) -> EndpointOut:  # fmt: skip
    return _set_paused(name, True, session, commit, store, audit)


@router.post("/{name}/resume", response_model=EndpointOut, summary="Deliver again")
def resume_endpoint(name: str, session: SessionDep, commit: ConfigChangeDep,
                    store: StoreDep, audit: AuditDep) -> EndpointOut:  # fmt: skip
    return _set_paused(name, False, session, commit, store, audit)
