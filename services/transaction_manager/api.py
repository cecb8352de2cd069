"""HTTP API of the transaction manager: accounts, partners, routes, streaming uploads, the
consolidated transfer log and the dead letters."""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import func
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from ferrylink.config import bump_config_version
from ferrylink.events import Event
from ferrylink.faults import fault_point
from ferrylink.models import Account, DeadEvent, Partner, Route, Transfer
from ferrylink.passwords import hash_password, verify_password
from ferrylink.paths import PathError, confined, relative_to
from ferrylink.service import ServiceRuntime
from ferrylink.telemetry import inject_headers
from ferrylink.work import FlagWork
from services.transaction_manager.steps import STEPS, PushStep, Step
from services.transaction_manager.transfer_log import (
    FAILED,
    RECEIVED,
    RECEIVING,
    TransferLog,
)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
SSH_KEY = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-\S+) [A-Za-z0-9+/=]+( .*)?$")
UPLOAD_CHUNK = 1 << 20


@dataclass
class TransactionManager:
    """What the API needs besides the runtime (kept on `app.state.tm`)."""

    runtime: ServiceRuntime
    data_dir: Path
    transfer_log: TransferLog
    serves_transfer_log: FlagWork


def get_tm(request: Request) -> TransactionManager:
    tm: TransactionManager = request.app.state.tm
    return tm


TM = Annotated[TransactionManager, Depends(get_tm)]
router = APIRouter()


def _changed(tm: TransactionManager, session: Session) -> None:
    """A configuration change: bump the version with it, commit, tell every service."""
    bump_config_version(session)
    session.commit()
    tm.runtime.announce_config_change()


def _check_name(value: str) -> str:
    if not NAME.match(value):
        raise ValueError("use 1-64 letters, digits, '.', '_', '@' or '-'")
    return value


# --------------------------------------------------------------------------------------------
# Accounts
# --------------------------------------------------------------------------------------------


class AccountIn(BaseModel):
    name: str = Field(examples=["acme"])
    password: str | None = Field(default=None, min_length=8, max_length=256)
    ssh_public_keys: list[str] = Field(default_factory=list)
    home: str | None = Field(default=None, description="Relative to the data directory.")

    _name = field_validator("name")(_check_name)

    @field_validator("ssh_public_keys")
    @classmethod
    def _keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            if not SSH_KEY.match(key.strip()):
                raise ValueError("not an OpenSSH public key line ('ssh-ed25519 AAAA... comment')")
        return [k.strip() for k in keys]


class AccountOut(BaseModel):
    name: str
    home: str
    has_password: bool
    ssh_public_keys: list[str]
    enabled: bool
    created_at: datetime


def _account_out(account: Account) -> AccountOut:
    return AccountOut(
        name=account.name, home=account.home, has_password=bool(account.password_hash),
        ssh_public_keys=[k for k in account.ssh_public_keys.splitlines() if k],
        enabled=account.enabled, created_at=account.created_at,
    )  # fmt: skip


@router.post("/accounts", status_code=201, response_model=AccountOut, tags=["accounts"])
def create_account(body: AccountIn, tm: TM) -> AccountOut:
    if not body.password and not body.ssh_public_keys:
        raise HTTPException(422, "an account needs a password or at least one SSH key")
    home_relative = body.home or f"homes/{body.name}"
    try:
        home = confined(tm.data_dir, home_relative)
    except PathError as exc:
        raise HTTPException(422, f"home: {exc}") from exc
    if home == tm.data_dir.resolve():
        raise HTTPException(422, "home: an account needs its own folder")
    with Session(tm.runtime.engine) as session:
        if session.get(Account, body.name) is not None:
            raise HTTPException(409, f"account {body.name!r} exists")
        account = Account(
            name=body.name,
            password_hash=hash_password(body.password) if body.password else None,
            ssh_public_keys="\n".join(body.ssh_public_keys),
            home=relative_to(tm.data_dir, home),
        )
        home.mkdir(parents=True, exist_ok=True)
        session.add(account)
        _changed(tm, session)
        session.refresh(account)
        return _account_out(account)


@router.get("/accounts", response_model=list[AccountOut], tags=["accounts"])
def list_accounts(tm: TM) -> list[AccountOut]:
    with Session(tm.runtime.engine) as session:
        return [_account_out(a) for a in session.exec(select(Account).order_by(Account.name))]


@router.get("/accounts/{name}", response_model=AccountOut, tags=["accounts"])
def get_account(name: str, tm: TM) -> AccountOut:
    with Session(tm.runtime.engine) as session:
        account = session.get(Account, name)
        if account is None:
            raise HTTPException(404, f"no account {name!r}")
        return _account_out(account)


@router.delete("/accounts/{name}", status_code=204, tags=["accounts"])
def delete_account(name: str, tm: TM) -> Response:
    with Session(tm.runtime.engine) as session:
        account = session.get(Account, name)
        if account is None:
            raise HTTPException(404, f"no account {name!r}")
        if session.exec(select(Route).where(Route.account == name)).first():
            raise HTTPException(409, f"account {name!r} still has routes; delete them first")
        session.delete(account)
        _changed(tm, session)
    return Response(status_code=204)


# --------------------------------------------------------------------------------------------
# Partners
# --------------------------------------------------------------------------------------------


class PartnerIn(BaseModel):
    name: str = Field(examples=["bank-sftp"])
    protocol: Literal["sftp", "http"]
    host: str = ""
    port: int = Field(default=22, ge=1, le=65535)
    username: str = ""
    password: str | None = Field(default=None, max_length=512)
    private_key: str | None = None
    remote_folder: str = "/"
    host_key: str | None = None
    check_host_key: bool = True
    url: str = ""
    verify_tls: bool = True

    _name = field_validator("name")(_check_name)


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


def _partner_out(p: Partner) -> PartnerOut:
    return PartnerOut(
        name=p.name, protocol=p.protocol, host=p.host, port=p.port, username=p.username,
        remote_folder=p.remote_folder, host_key=p.host_key, check_host_key=p.check_host_key,
        url=p.url, verify_tls=p.verify_tls, has_password=bool(p.password),
        has_private_key=bool(p.private_key),
    )  # fmt: skip


def _check_partner(body: PartnerIn) -> None:
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


@router.post("/partners", status_code=201, response_model=PartnerOut, tags=["partners"])
def create_partner(body: PartnerIn, tm: TM) -> PartnerOut:
    _check_partner(body)
    with Session(tm.runtime.engine) as session:
        if session.get(Partner, body.name) is not None:
            raise HTTPException(409, f"partner {body.name!r} exists")
        partner = Partner(**body.model_dump())
        session.add(partner)
        _changed(tm, session)
        session.refresh(partner)
        return _partner_out(partner)


@router.get("/partners", response_model=list[PartnerOut], tags=["partners"])
def list_partners(tm: TM) -> list[PartnerOut]:
    with Session(tm.runtime.engine) as session:
        return [_partner_out(p) for p in session.exec(select(Partner).order_by(Partner.name))]


@router.delete("/partners/{name}", status_code=204, tags=["partners"])
def delete_partner(name: str, tm: TM) -> Response:
    with Session(tm.runtime.engine) as session:
        partner = session.get(Partner, name)
        if partner is None:
            raise HTTPException(404, f"no partner {name!r}")
        session.delete(partner)
        _changed(tm, session)
    return Response(status_code=204)


# --------------------------------------------------------------------------------------------
# Routes
# --------------------------------------------------------------------------------------------


class RouteIn(BaseModel):
    account: str
    pattern: str = Field(min_length=1, max_length=255, examples=["*.csv"])
    position: int = 0
    steps: list[Step] = Field(min_length=1)
    enabled: bool = True


class RouteOut(RouteIn):
    id: int


def _route_out(route: Route) -> RouteOut:
    assert route.id is not None
    return RouteOut(
        id=route.id, account=route.account, pattern=route.pattern, position=route.position,
        steps=STEPS.validate_json(route.steps_json), enabled=route.enabled,
    )  # fmt: skip


@router.post("/routes", status_code=201, response_model=RouteOut, tags=["routes"])
def create_route(body: RouteIn, tm: TM) -> RouteOut:
    with Session(tm.runtime.engine) as session:
        if session.get(Account, body.account) is None:
            raise HTTPException(422, f"unknown account {body.account!r}")
        for step in body.steps:
            if isinstance(step, PushStep) and session.get(Partner, step.partner) is None:
                raise HTTPException(422, f"unknown partner {step.partner!r}")
        route = Route(
            account=body.account, pattern=body.pattern, position=body.position,
            steps_json=STEPS.dump_json(body.steps).decode(), enabled=body.enabled,
        )  # fmt: skip
        session.add(route)
        _changed(tm, session)
        session.refresh(route)
        return _route_out(route)


@router.get("/routes", response_model=list[RouteOut], tags=["routes"])
def list_routes(tm: TM, account: str | None = None) -> list[RouteOut]:
    with Session(tm.runtime.engine) as session:
        query = select(Route).order_by(col(Route.account), col(Route.position), col(Route.id))
        if account:
            query = query.where(Route.account == account)
        return [_route_out(r) for r in session.exec(query)]


@router.delete("/routes/{route_id}", status_code=204, tags=["routes"])
def delete_route(route_id: int, tm: TM) -> Response:
    with Session(tm.runtime.engine) as session:
        route = session.get(Route, route_id)
        if route is None:
            raise HTTPException(404, f"no route {route_id}")
        session.delete(route)
        _changed(tm, session)
    return Response(status_code=204)


# --------------------------------------------------------------------------------------------
# Uploads
# --------------------------------------------------------------------------------------------


class UploadOut(BaseModel):
    event_id: str
    cycle_id: str
    account: str
    path: str
    bytes: int


def _authenticate(request: Request, session: Session, account_name: str) -> Account:
    """HTTP Basic auth of the account itself (the same answer for every failure)."""
    unauthorized = HTTPException(
        401, "authentication failed", headers={"WWW-Authenticate": 'Basic realm="ferrylink"'}
    )
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        raise unauthorized
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise unauthorized from None
    account = session.get(Account, account_name)
    if user != account_name or account is None or not account.enabled:
        raise unauthorized
    if not verify_password(password, account.password_hash):
        raise unauthorized
    return account


@router.put(
    "/files/{account}/{path:path}",
    status_code=201,
    response_model=UploadOut,
    tags=["files"],
    summary="Upload a file into the account's home (streamed; HTTP Basic auth)",
)
async def upload(account: str, path: str, request: Request, tm: TM) -> UploadOut:
    # Blocking work (the KDF, the database, the broker) runs in the thread pool; only the
    # body streaming runs on the event loop, a chunk at a time, never the whole file.
    target, relative = await run_in_threadpool(_upload_target, tm, request, account, path)
    event = Event(kind="file.arrived", account=account, path=relative,
                  params={"protocol": "http"})  # fmt: skip
    leg_key = f"{event.id}:receive"
    await run_in_threadpool(
        _record, tm, leg_key, RECEIVING, cycle_id=event.cycle_id, event_id=event.id,
        account=account, file_name=relative, leg="receive", direction="inbound",
        protocol="http",
    )  # fmt: skip
    target.parent.mkdir(parents=True, exist_ok=True)
    # Stream to a temporary name; the final name appears only when complete.
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    size = 0
    # The checksum travels with the event, so a route's checksum step can verify the file.
    digest = hashlib.sha256()
    try:
        with temporary.open("wb") as stream:
            async for chunk in request.stream():
                stream.write(chunk)
                digest.update(chunk)
                size += len(chunk)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        await run_in_threadpool(_record, tm, leg_key, FAILED, detail="upload interrupted")
        raise
    event.size = size
    event.checksum = digest.hexdigest()
    await run_in_threadpool(_received, tm, leg_key, event)
    return UploadOut(event_id=event.id, cycle_id=event.cycle_id, account=account,
                     path=relative, bytes=size)  # fmt: skip


def _upload_target(tm: TransactionManager, request: Request, account: str, path: str
                   ) -> tuple[Path, str]:  # fmt: skip
    with Session(tm.runtime.engine) as session:
        found = _authenticate(request, session, account)
        home = confined(tm.data_dir, found.home)
    try:
        target = confined(home, path)
    except PathError as exc:
        raise HTTPException(400, str(exc)) from exc
    if target == home or path.endswith("/"):
        raise HTTPException(400, "give a file name")
    return target, relative_to(home, target)


def _received(tm: TransactionManager, leg_key: str, event: Event) -> None:
    """RECEIVED and the file's event in one transaction (the event in the outbox), then
    published: a crash or a failed publish after the commit delays routing, never skips it."""
    from services.transaction_manager import outbox

    with Session(tm.runtime.engine, expire_on_commit=False) as session:
        leg = tm.transfer_log.stage(session, leg_key, RECEIVED, bytes=event.size or 0)
        row = outbox.stage(session, tm.runtime.work_queue("events"), event.to_bytes(),
                           event.id, inject_headers())  # fmt: skip
        session.commit()
    fault_point("after-received-before-publish")
    if leg is not None:
        tm.transfer_log.publish(leg)  # the relay of states is not yet an outbox (see README)
    outbox.send(tm.runtime.engine, tm.runtime.publisher, [row])


def _record(tm: TransactionManager, leg_key: str, status: str, **fields: Any) -> None:
    with Session(tm.runtime.engine) as session:
        tm.transfer_log.record(session, leg_key, status, **fields)


# --------------------------------------------------------------------------------------------
# The consolidated transfer log
# --------------------------------------------------------------------------------------------


class TransferOut(BaseModel):
    id: int
    cycle_id: str
    event_id: str
    leg: str
    status: str
    account: str
    direction: str
    file_name: str
    bytes: int
    protocol: str
    partner: str | None
    node_id: str
    started_at: datetime
    duration_ms: int | None
    detail: str


class TransferPage(BaseModel):
    total: int
    items: list[TransferOut]


@router.get(
    "/transfers",
    response_model=TransferPage,
    tags=["transfers"],
    responses={409: {"description": "Not the primary: ask the primary's TM"}},
)
def list_transfers(
    tm: TM,
    account: str | None = None,
    status: str | None = None,
    file_name: str | None = Query(default=None, description="Substring of the file name."),
    direction: Literal["inbound", "outbound", "internal"] | None = None,
    cycle_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    limit: int = Query(default=100, ge=1, le=1000),
    offset: int = Query(default=0, ge=0),
) -> TransferPage:
    if not tm.serves_transfer_log.is_set:
        assignment = tm.runtime.follower.status()
        raise HTTPException(
            409, f"the consolidated transfer log is served by the primary "
                 f"({assignment['primary'] or 'none yet'})",
        )  # fmt: skip
    filters: list[Any] = []
    if account:
        filters.append(Transfer.account == account)
    if status:
        filters.append(Transfer.status == status.upper())
    if file_name:
        filters.append(col(Transfer.file_name).contains(file_name))
    if direction:
        filters.append(Transfer.direction == direction)
    if cycle_id:
        filters.append(Transfer.cycle_id == cycle_id)
    if since:
        filters.append(col(Transfer.started_at) >= since)
    if until:
        filters.append(col(Transfer.started_at) < until)
    with Session(tm.runtime.engine) as session:
        total = session.exec(select(func.count()).select_from(Transfer).where(*filters)).one()
        rows = session.exec(
            select(Transfer).where(*filters)
            .order_by(col(Transfer.started_at).desc(), col(Transfer.id).desc())
            .offset(offset).limit(limit)
        ).all()  # fmt: skip
        return TransferPage(total=total,
                            items=[TransferOut.model_validate(r, from_attributes=True)
                                   for r in rows])  # fmt: skip


# --------------------------------------------------------------------------------------------
# Dead letters
# --------------------------------------------------------------------------------------------


DEAD_PREVIEW_BYTES = 512


class DeadOut(BaseModel):
    id: str
    queue: str
    reason: str
    size: int
    preview: str = Field(description=f"The first {DEAD_PREVIEW_BYTES} bytes of the body.")
    dead_at: datetime
    replayed_at: datetime | None


def _dead_out(dead: DeadEvent) -> DeadOut:
    return DeadOut(id=dead.id, queue=dead.queue, reason=dead.reason, size=len(dead.body),
                   preview=dead.body[:DEAD_PREVIEW_BYTES].decode(errors="replace"),
                   dead_at=dead.dead_at, replayed_at=dead.replayed_at)  # fmt: skip


@router.get("/events/dead", response_model=list[DeadOut], tags=["events"])
def list_dead(
    tm: TM, include_replayed: bool = False, limit: int = Query(default=100, ge=1, le=1000)
) -> list[DeadOut]:
    with Session(tm.runtime.engine) as session:
        query = select(DeadEvent).order_by(col(DeadEvent.dead_at).desc()).limit(limit)
        if not include_replayed:
            query = query.where(col(DeadEvent.replayed_at).is_(None))
        return [_dead_out(d) for d in session.exec(query)]


@router.get("/events/dead/{dead_id}/body", tags=["events"], response_class=Response)
def dead_body(dead_id: str, tm: TM) -> Response:
    """The whole body of a dead letter, as it was published."""
    with Session(tm.runtime.engine) as session:
        dead = session.get(DeadEvent, dead_id)
        if dead is None:
            raise HTTPException(404, f"no dead letter {dead_id!r}")
        return Response(dead.body, media_type="application/octet-stream")


@router.post("/events/dead/{dead_id}/replay", response_model=DeadOut, tags=["events"])
def replay_dead(dead_id: str, tm: TM) -> DeadOut:
    from services.transaction_manager.dead_letters import replay

    dead = replay(tm.runtime.engine, tm.runtime.publisher, dead_id)
    if dead is None:
        raise HTTPException(404, f"no dead letter {dead_id!r}")
    return _dead_out(dead)
