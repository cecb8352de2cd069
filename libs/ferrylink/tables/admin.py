"""The administration plane: administrators, their API tokens, the audit log, and the
idempotency keys of API requests."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Index
from sqlmodel import Field, SQLModel

from ferrylink.clock import utcnow


class AdminUser(SQLModel, table=True):
    """Someone who manages the cluster through the API: `admin` (everything) or `operator`
    (read everything, fail over by hand)."""

    __tablename__ = "admin_user"

    name: str = Field(primary_key=True, max_length=64)
    password_hash: str = Field(max_length=512)
    role: str = Field(max_length=16)
    enabled: bool = Field(default=True)
    created_at: datetime = Field(default_factory=utcnow)


class ApiToken(SQLModel, table=True):
    """A bearer token: only its SHA-256 is stored, in the shared database, so any server
    accepts it and it survives restarts; the role is the admin's current one."""

    __tablename__ = "api_token"

    id: str = Field(primary_key=True, max_length=32)  # the public part of the token
    secret_sha256: str = Field(max_length=64)
    admin: str = Field(index=True, max_length=64)
    description: str = Field(default="", max_length=255)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime = Field(index=True)
    revoked_at: datetime | None = Field(default=None)


class AuditRecord(SQLModel, table=True):
    """One administrative change: who, what, when, from where, before and after (secrets
    masked)."""

    __tablename__ = "audit_record"

    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    actor: str = Field(index=True, max_length=64)
    address: str = Field(default="", max_length=64)
    action: str = Field(index=True, max_length=64)  # e.g. "account.update"
    target: str = Field(default="", index=True, max_length=255)
    before_json: str | None = Field(default=None)
    after_json: str | None = Field(default=None)


class IdempotencyRecord(SQLModel, table=True):
    """A request sent with an `Idempotency-Key`: its first answer, replayed to a retry with
    the same key and body until `expires_at` (ferrylink.idempotency)."""

    __tablename__ = "idempotency_record"

    # SHA-256 of who asked (the Authorization header), the method, the path and the key.
    key: str = Field(primary_key=True, max_length=64)
    request_sha256: str = Field(default="", max_length=64)
    # 0 while the first request is under way.
    status: int = Field(default=0)
    headers_json: str = Field(default="[]")
    body: bytes = Field(default=b"")
    created_at: float
    expires_at: float = Field(index=True)


class LoginFailure(SQLModel, table=True):
    """A failed login, counted against its address and its account (`scope`, `key`) by every
    process of the cluster (ferrylink.login_guard); rows older than the window are deleted."""

    __tablename__ = "login_failure"
    __table_args__ = (Index("ix_login_failure_scope_key", "scope", "key"),)

    id: int | None = Field(default=None, primary_key=True)
    scope: str = Field(max_length=16)  # address | account
    key: str = Field(max_length=255)
    at: float = Field(index=True)  # epoch seconds


class LoginBan(SQLModel, table=True):
    """An address or account refused until `banned_until` (epoch seconds) on every server."""

    __tablename__ = "login_ban"

    scope: str = Field(primary_key=True, max_length=16)
    key: str = Field(primary_key=True, max_length=255)
    banned_until: float = Field(index=True)
