"""Partners: the remote SFTP and HTTP endpoints files are pushed to or pulled from."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field, field_validator
from sqlmodel import select

from ferrylink.deps import SessionDep
from ferrylink.destinations import DestinationPolicy, DestinationRefused
from ferrylink.models import Partner
from services.transaction_manager.api.deps import TMDep, check_name, config_changed

router = APIRouter(prefix="/partners", tags=["partners"])


class PartnerIn(BaseModel):
    name: str = Field(examples=["bank-sftp"])
    protocol: Literal["sftp", "http"]
    host: str = Field(default="", max_length=255)
    port: int = Field(default=22, ge=1, le=65535)
    username: str = ""
    password: str | None = Field(default=None, max_length=512)
    private_key: str | None = Field(default=None, max_length=16384)
    remote_folder: str = Field(default="/", max_length=1024)
    host_key: str | None = Field(default=None, max_length=16384)
    check_host_key: bool = True
    url: str = Field(default="", max_length=2048)
    verify_tls: bool = True

    _name = field_validator("name")(check_name)


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


@router.post("", status_code=201, response_model=PartnerOut)
def create_partner(body: PartnerIn, tm: TMDep, session: SessionDep) -> PartnerOut:
    check_partner(body, tm.destinations)
    if session.get(Partner, body.name) is not None:
        raise HTTPException(409, f"partner {body.name!r} exists")
    partner = Partner(**body.model_dump())
    session.add(partner)
    config_changed(tm, session)
    session.refresh(partner)
    return partner_out(partner)


@router.get("", response_model=list[PartnerOut])
def list_partners(session: SessionDep) -> list[PartnerOut]:
    return [partner_out(p) for p in session.exec(select(Partner).order_by(Partner.name))]


@router.delete("/{name}", status_code=204)
def delete_partner(name: str, tm: TMDep, session: SessionDep) -> Response:
    partner = session.get(Partner, name)
    if partner is None:
        raise HTTPException(404, f"no partner {name!r}")
    session.delete(partner)
    config_changed(tm, session)
    return Response(status_code=204)
