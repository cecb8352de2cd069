"""The administration endpoints every service serves: log in for a token, list and revoke
tokens, manage administrators. Logging in is public (it checks a password, behind the
failed-login defender); everything else is behind the admin token like any router."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select
from starlette.concurrency import run_in_threadpool

from ferrylink.admin_auth import (
    DEFAULT_TOKEN_TTL,
    AdminError,
    PrincipalDep,
    Role,
    create_admin,
    issue_token,
    utc,
)
from ferrylink.audit import AuditDep, Auditor, client_address
from ferrylink.deps import ConfigChangeDep, EngineDep, SessionDep
from ferrylink.login_guard import LoginGuard, LoginRefused, check_password
from ferrylink.paging import Page, PagingDep, page_of
from ferrylink.passwords import hash_password
from ferrylink.tables.admin import AdminUser, ApiToken


def get_login_guard(request: Request) -> LoginGuard:
    guard: LoginGuard = request.app.state.login_guard
    return guard


LoginGuardDep = Annotated[LoginGuard, Depends(get_login_guard)]


def guarded_refusal(exc: LoginRefused) -> HTTPException:
    return HTTPException(429, exc.reason, headers={"Retry-After": str(int(exc.retry_after) + 1)})


login_router = APIRouter(prefix="/auth", tags=["auth"])
router = APIRouter(tags=["auth"])


class LoginIn(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)
    ttl_hours: float = Field(
        DEFAULT_TOKEN_TTL.total_seconds() / 3600, gt=0, le=24 * 366, description="Token life."
    )
    description: str = Field("", max_length=255)


class TokenOut(BaseModel):
    token: str = Field(description="Send as `Authorization: Bearer <token>`; shown once.")
    token_id: str
    admin: str
    role: str
    expires_at: datetime


@login_router.post(
    "/token",
    response_model=TokenOut,
    summary="Log in as an administrator: a token valid on every server of the cluster",
    responses={401: {"description": "Wrong name or password"}, 429: {"description": "Banned"}},
)
async def log_in(
    body: LoginIn, request: Request, engine: EngineDep, guard: LoginGuardDep
) -> TokenOut:
    return await authenticate(engine, guard, client_address(request), body)


async def authenticate(engine: Engine, guard: LoginGuard, address: str, body: LoginIn
                       ) -> TokenOut:  # fmt: skip
    """Check an administrator's password behind the failed-login defender and issue a token
    (HTTPException 401 or 429 otherwise); shared by `POST /auth/token` and the web login."""
    try:
        guard.check(address, f"admin:{body.name}")
    except LoginRefused as exc:
        raise guarded_refusal(exc) from None

    def attempt() -> TokenOut | None:
        with Session(engine) as session:
            admin = session.get(AdminUser, body.name)
            stored = admin.password_hash if admin else None
            if not check_password(body.password, stored) or admin is None or not admin.enabled:
                return None
            token, row = issue_token(
                session, admin.name, timedelta(hours=body.ttl_hours), body.description
            )
            Auditor(admin.name, address).record(
                session, "token.issue", row.id, after=_token_info(row)
            )
            session.commit()
            return TokenOut(token=token, token_id=row.id, admin=admin.name, role=admin.role,
                            expires_at=utc(row.expires_at))  # fmt: skip

    issued = await run_in_threadpool(attempt)
    if issued is None:
        await asyncio.sleep(guard.failed(address, f"admin:{body.name}"))
        raise HTTPException(401, "wrong name or password")
    guard.succeeded(address, f"admin:{body.name}")
    return issued


class WhoAmI(BaseModel):
    admin: str
    role: str
    token_id: str


@router.get("/auth/me", response_model=WhoAmI, summary="Who this token belongs to")
def who_am_i(principal: PrincipalDep) -> WhoAmI:
    return WhoAmI(admin=principal.admin, role=principal.role, token_id=principal.token_id)


class TokenInfo(BaseModel):
    id: str
    admin: str
    description: str
    created_at: datetime
    expires_at: datetime
    revoked_at: datetime | None


def _token_info(row: ApiToken) -> TokenInfo:
    return TokenInfo.model_validate(row, from_attributes=True)


@router.get(
    "/auth/tokens", response_model=Page[TokenInfo], summary="Tokens (an operator sees their own)"
)
def list_tokens(principal: PrincipalDep, session: SessionDep, paging: PagingDep) -> Page[TokenInfo]:
    query = select(ApiToken).order_by(col(ApiToken.created_at), col(ApiToken.id))
    if principal.role != "admin":
        query = query.where(ApiToken.admin == principal.admin)
    return page_of(session, query, paging, _token_info)


@router.delete("/auth/tokens/{token_id}", status_code=204, summary="Revoke a token")
def revoke_token(token_id: str, audit: AuditDep, session: SessionDep) -> Response:
    row = session.get(ApiToken, token_id)
    if row is None:
        raise HTTPException(404, f"no token {token_id!r}")
    if row.revoked_at is None:
        before = _token_info(row)
        row.revoked_at = datetime.now().astimezone()
        session.add(row)
        audit.record(session, "token.revoke", token_id, before, _token_info(row))
        session.commit()
    return Response(status_code=204)


class AdminIn(BaseModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.@-]*$")
    password: str = Field(min_length=12, max_length=1024)
    role: Role


class AdminPatch(BaseModel):
    password: str | None = Field(None, min_length=12, max_length=1024)
    role: Role | None = None
    enabled: bool | None = None


class AdminOut(BaseModel):
    name: str
    role: str
    enabled: bool
    created_at: datetime


def _admin_out(admin: AdminUser) -> AdminOut:
    return AdminOut(name=admin.name, role=admin.role, enabled=admin.enabled,
                    created_at=admin.created_at)  # fmt: skip


@router.get("/admins", response_model=Page[AdminOut], summary="Administrators")
def list_admins(session: SessionDep, paging: PagingDep) -> Page[AdminOut]:
    return page_of(session, select(AdminUser).order_by(col(AdminUser.name)), paging, _admin_out)


@router.post("/admins", status_code=201, response_model=AdminOut, summary="Add an administrator")
def add_admin(
    body: AdminIn,
    session: SessionDep,
    audit: AuditDep,
    response: Response,
    commit: ConfigChangeDep,
) -> AdminOut:
    try:
        admin = create_admin(session, body.name, body.password, body.role)
    except AdminError as exc:
        raise HTTPException(409 if "exists" in str(exc) else 422, str(exc)) from exc
    audit.record(session, "admin.create", body.name, after=admin)
    commit(session)
    session.refresh(admin)
    response.headers["Location"] = f"/admins/{admin.name}"
    return _admin_out(admin)


@router.patch("/admins/{name}", response_model=AdminOut, summary="Change role, password, enabled")
def update_admin(
    name: str,
    body: AdminPatch,
    principal: PrincipalDep,
    audit: AuditDep,
    session: SessionDep,
    commit: ConfigChangeDep,
) -> AdminOut:
    admin = session.get(AdminUser, name)
    if admin is None:
        raise HTTPException(404, f"no administrator {name!r}")
    if name == principal.admin and (body.role == "operator" or body.enabled is False):
        raise HTTPException(409, "you cannot demote or disable yourself; ask another admin")
    before = admin.model_dump(mode="json")
    if body.password is not None:
        admin.password_hash = hash_password(body.password)
    if body.role is not None:
        admin.role = body.role
    if body.enabled is not None:
        admin.enabled = body.enabled
    session.add(admin)
    audit.record(session, "admin.update", name, before, admin)
    commit(session)
    session.refresh(admin)
    return _admin_out(admin)


@router.delete("/admins/{name}", status_code=204, summary="Remove an administrator")
def delete_admin(
    name: str,
    principal: PrincipalDep,
    audit: AuditDep,
    session: SessionDep,
    commit: ConfigChangeDep,
) -> Response:
    admin = session.get(AdminUser, name)
    if admin is None:
        raise HTTPException(404, f"no administrator {name!r}")
    if name == principal.admin:
        raise HTTPException(409, "you cannot remove yourself; ask another admin")
    audit.record(session, "admin.delete", name, before=admin)
    session.delete(admin)
    commit(session)
    return Response(status_code=204)
