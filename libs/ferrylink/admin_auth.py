"""Administrators and their API tokens, and the one security dependency every service's
routers are mounted behind.

A token is `flk_<id>_<secret>`: the id finds the row, the secret is compared with its
SHA-256 (a random 256-bit secret needs no slow KDF). Tokens and admins live in the shared
database, so a token issued by any server works on every server and survives restarts.

Reading (GET/HEAD) needs any valid token; every other method needs the `admin` role unless
the route says an operator may do it (`OPERATOR_MAY`, visible in the OpenAPI document).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import Depends, HTTPException, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session, select

from ferrylink.deps import SessionDep
from ferrylink.passwords import hash_password
from ferrylink.tables.admin import AdminUser, ApiToken

Role = Literal["admin", "operator"]
ROLES: tuple[Role, ...] = ("admin", "operator")
TOKEN_PREFIX = "flk_"
DEFAULT_TOKEN_TTL = timedelta(hours=8)
MAX_TOKEN_TTL = timedelta(days=366)
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# openapi_extra of a write route an operator may call (manual failover).
OPERATOR_MAY: dict[str, Any] = {"x-ferrylink-role": "operator"}

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="AdminToken",
    description="An administrator's API token (`POST /auth/token`, or `ferrylink admin token`).",
)


class AdminError(ValueError):
    """A refused administrator or token operation (the message says why)."""


@dataclass(frozen=True)
class Principal:
    """Who a request acts as."""

    admin: str
    role: str
    token_id: str


def utc(value: datetime) -> datetime:
    """SQLite hands datetimes back naive; they were stored in UTC."""
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def create_admin(session: Session, name: str, password: str, role: str) -> AdminUser:
    """Add an administrator (the caller commits)."""
    if role not in ROLES:
        raise AdminError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if len(password) < 12:
        raise AdminError("an administrator's password needs at least 12 characters")
    if session.get(AdminUser, name) is not None:
        raise AdminError(f"administrator {name!r} exists")
    admin = AdminUser(name=name, password_hash=hash_password(password), role=role)
    session.add(admin)
    return admin


def issue_token(
    session: Session, admin: str, ttl: timedelta = DEFAULT_TOKEN_TTL, description: str = ""
) -> tuple[str, ApiToken]:
    """A new token for `admin` (the caller commits); the secret is only in the return value."""
    if not timedelta(0) < ttl <= MAX_TOKEN_TTL:
        raise AdminError(f"a token lives more than 0 s and at most {MAX_TOKEN_TTL.days} days")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    row = ApiToken(
        id=token_id,
        secret_sha256=_sha256(secret),
        admin=admin,
        description=description,
        expires_at=datetime.now(UTC) + ttl,
    )
    session.add(row)
    return f"{TOKEN_PREFIX}{token_id}_{secret}", row


def check_token(session: Session, token: str) -> Principal | None:
    """The principal a token stands for, or None (unknown, wrong, expired, revoked, or its
    administrator disabled or deleted)."""
    if not token.startswith(TOKEN_PREFIX):
        return None
    token_id, _, secret = token[len(TOKEN_PREFIX) :].partition("_")
    row = session.get(ApiToken, token_id) if token_id and secret else None
    if row is None or not hmac.compare_digest(row.secret_sha256, _sha256(secret)):
        return None
    if row.revoked_at is not None or utc(row.expires_at) <= datetime.now(UTC):
        return None
    admin = session.get(AdminUser, row.admin)
    if admin is None or not admin.enabled:
        return None
    return Principal(admin=admin.name, role=admin.role, token_id=row.id)


def admins_exist(session: Session) -> bool:
    return session.exec(select(AdminUser).limit(1)).first() is not None


def require_admin_token(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
) -> Principal:
    """The one check in front of every administrative route (see module docstring)."""
    principal = check_token(session, credentials.credentials) if credentials else None
    if principal is None:
        raise HTTPException(
            401,
            "a valid administrator token is required (Authorization: Bearer ...)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if request.method not in READ_METHODS and principal.role != "admin":
        route = request.scope.get("route")
        allowed = (getattr(route, "openapi_extra", None) or {}).get("x-ferrylink-role")
        if principal.role != allowed:
            raise HTTPException(
                403, f"the {principal.role} role may not change anything here; ask an admin"
            )
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(require_admin_token)]
