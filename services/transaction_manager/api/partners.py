"""Partners: the remote SFTP and HTTP endpoints files are pushed to or pulled from."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field, ValidationError, field_validator
from sqlmodel import Session, col, select

from ferrylink.audit import AuditDep
from ferrylink.deps import SessionDep
from ferrylink.destinations import DestinationPolicy, DestinationRefused
from ferrylink.paging import Page, PagingDep, page_of
from ferrylink.secrets_box import SecretError, box
from ferrylink.tables.accounts import Partner
from ferrylink.tables.scheduling import ScheduledJob
from ferrylink.tables.transfers import Route
from services.transaction_manager.api.deps import TMDep, check_name, config_changed
from services.transaction_manager.partners import load_private_key
from services.transaction_manager.steps import STEPS, PushStep

router = APIRouter(prefix="/partners", tags=["partners"])


class PartnerIn(BaseModel):
    name: str = Field(examples=["bank-sftp"])
    protocol: Literal["sftp", "http"]
    host: str = Field(default="", max_length=255)
    port: int = Field(default=22, ge=1, le=65535)
    username: str = ""
    password: str | None = Field(default=None, max_length=512)
    private_key: str | None = Field(default=None, max_length=16384)
    private_key_passphrase: str | None = Field(
        default=None, max_length=512, description="For an encrypted private key."
    )
    remote_folder: str = Field(default="/", max_length=1024)
    host_key: str | None = Field(default=None, max_length=16384)
    check_host_key: bool = True
    url: str = Field(default="", max_length=2048)
    verify_tls: bool = True

    _name = field_validator("name")(check_name)


class PartnerPatch(BaseModel):
    """What an update may change; absent fields stay as they are (`null` clears a secret)."""

    protocol: Literal["sftp", "http"] | None = None
    host: str | None = Field(default=None, max_length=255)
    port: int | None = Field(default=None, ge=1, le=65535)
    username: str | None = None
    password: str | None = Field(default=None, max_length=512)
    private_key: str | None = Field(default=None, max_length=16384)
    private_key_passphrase: str | None = Field(default=None, max_length=512)
    remote_folder: str | None = Field(default=None, max_length=1024)
    host_key: str | None = Field(default=None, max_length=16384)
    check_host_key: bool | None = None
    url: str | None = Field(default=None, max_length=2048)
    verify_tls: bool | None = None


class PartnerOut(BaseModel):
    name: str
    protocol: str
    host: str
    port: int
    username: str
    remote_folder: str
    host_key: str | None
    check_host_key: bool
    url: str
    verify_tls: bool
    has_password: bool
    has_private_key: bool


def partner_out(p: Partner) -> PartnerOut:
    return PartnerOut(
        name=p.name, protocol=p.protocol, host=p.host, port=p.port, username=p.username,
        remote_folder=p.remote_folder, host_key=p.host_key, check_host_key=p.check_host_key,
        url=p.url, verify_tls=p.verify_tls, has_password=bool(p.password),
        has_private_key=bool(p.private_key),
    )  # fmt: skip


def check_partner(body: PartnerIn, destinations: DestinationPolicy) -> None:
    if body.protocol == "sftp":
        if not body.host or not body.username:
            raise HTTPException(422, "an SFTP partner needs host and username")
        if not body.password and not body.private_key:
            raise HTTPException(422, "an SFTP partner needs a password or a private key")
        if body.private_key:
            try:
                load_private_key(body.private_key, body.private_key_passphrase)
            except ValueError as exc:
                raise HTTPException(422, f"private_key: {exc}") from None
        if body.check_host_key and not body.host_key:
            raise HTTPException(
                422, "give the partner's host_key, or set check_host_key to false explicitly"
            )
    elif not body.url.startswith(("http://", "https://")):
        raise HTTPException(422, "an HTTP partner needs a url starting with http:// or https://")
    try:
        if body.protocol == "sftp":
            destinations.check_host(body.host)
        else:
            destinations.check_url(body.url)
    except DestinationRefused as exc:
        raise HTTPException(422, f"partner refused: {exc}") from exc


SECRET_FIELDS = ("password", "private_key", "private_key_passphrase")


def sealed(fields: dict[str, Any]) -> dict[str, Any]:
    """The fields with their secrets encrypted for storage (ferrylink.secrets_box)."""
    return fields | {k: box().encrypt(fields.get(k)) for k in SECRET_FIELDS if k in fields}


def opened(fields: dict[str, Any]) -> dict[str, Any]:
    return fields | {k: box().decrypt(fields.get(k)) for k in SECRET_FIELDS if k in fields}


def _get(session: Session, name: str) -> Partner:
    partner = session.get(Partner, name)
    if partner is None:
        raise HTTPException(404, f"no partner {name!r}")
    return partner


@router.post("", status_code=201, response_model=PartnerOut)
def create_partner(
    body: PartnerIn, tm: TMDep, session: SessionDep, audit: AuditDep, response: Response
) -> PartnerOut:
    check_partner(body, tm.destinations)
    if session.get(Partner, body.name) is not None:
        raise HTTPException(409, f"partner {body.name!r} exists")
    partner = Partner(**sealed(body.model_dump()))
    session.add(partner)
    audit.record(session, "partner.create", partner.name, after=partner)
    config_changed(tm, session)
    session.refresh(partner)
    response.headers["Location"] = f"/partners/{partner.name}"
    return partner_out(partner)


@router.get("", response_model=Page[PartnerOut])
def list_partners(session: SessionDep, paging: PagingDep) -> Page[PartnerOut]:
    return page_of(session, select(Partner).order_by(col(Partner.name)), paging, partner_out)


@router.get("/{name}", response_model=PartnerOut)
def get_partner(name: str, session: SessionDep) -> PartnerOut:
    return partner_out(_get(session, name))


@router.patch("/{name}", response_model=PartnerOut, summary="Change a partner, rotate secrets")
def update_partner(
    name: str, body: PartnerPatch, tm: TMDep, session: SessionDep, audit: AuditDep
) -> PartnerOut:
    partner = _get(session, name)
    before = partner.model_dump(mode="json")
    current: dict[str, Any] = {k: v for k, v in before.items() if k in PartnerIn.model_fields}
    try:
        current = opened(current)
    except SecretError as exc:
        raise HTTPException(409, f"partner {name!r}: {exc}; give its secrets again") from None
    try:
        wanted = PartnerIn(**(current | body.model_dump(exclude_unset=True)))
    except ValidationError as exc:
        raise HTTPException(422, "; ".join(str(e["msg"]) for e in exc.errors())) from None
    check_partner(wanted, tm.destinations)
    changed = {k: v for k, v in wanted.model_dump(exclude={"name"}).items() if current[k] != v}
    for key, value in sealed(changed).items():  # an unchanged secret keeps its ciphertext
        setattr(partner, key, value)
    session.add(partner)
    audit.record(session, "partner.update", name, before, partner)
    config_changed(tm, session)
    session.refresh(partner)
    return partner_out(partner)


def partner_users(session: Session, name: str) -> list[str]:
    """What still sends to or fetches from the partner: routes' push steps, pull/push jobs."""
    users = []
    for route in session.exec(select(Route).order_by(col(Route.id))):
        steps = STEPS.validate_json(route.steps_json)
        if any(isinstance(step, PushStep) and step.partner == name for step in steps):
            users.append(f"route {route.id}")
    for job in session.exec(
        select(ScheduledJob).where(col(ScheduledJob.kind).in_(["pull", "push"]))
    ):
        if json.loads(job.params_json).get("partner") == name:
            users.append(f"job {job.name!r}")
    return users


@router.delete("/{name}", status_code=204)
def delete_partner(name: str, tm: TMDep, session: SessionDep, audit: AuditDep) -> Response:
    partner = _get(session, name)
    users = partner_users(session, name)
    if users:
        raise HTTPException(
            409,
            f"partner {name!r} is still used by {', '.join(users)}; change or delete them first",
        )
    audit.record(session, "partner.delete", name, before=partner)
    session.delete(partner)
    config_changed(tm, session)
    return Response(status_code=204)
