"""Accounts: partners' logins (password and/or SSH keys) and their homes."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import PurePosixPath

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field, field_validator
from sqlmodel import Session, col, select

from ferrylink.audit import AuditDep
from ferrylink.deps import SessionDep
from ferrylink.paging import Page, PagingDep, page_of
from ferrylink.passwords import hash_password
from ferrylink.paths import PathError, confined, relative_to
from ferrylink.tables.accounts import Account
from ferrylink.tables.transfers import Route
from services.transaction_manager.api.deps import TMDep, check_name, config_changed

SSH_KEY = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-\S+) [A-Za-z0-9+/=]+( .*)?$")

router = APIRouter(prefix="/accounts", tags=["accounts"])


def check_keys(keys: list[str] | None) -> list[str] | None:
    if keys is None:
        return None
    for key in keys:
        if not SSH_KEY.match(key.strip()):
            raise ValueError("not an OpenSSH public key line ('ssh-ed25519 AAAA... comment')")
    return [k.strip() for k in keys]


class AccountIn(BaseModel):
    name: str = Field(examples=["acme"])
    password: str | None = Field(default=None, min_length=8, max_length=256)
    ssh_public_keys: list[str] = Field(default_factory=list, max_length=100)
    home: str | None = Field(default=None, description="Relative to the data directory.")
    enabled: bool = True

    _name = field_validator("name")(check_name)
    _keys = field_validator("ssh_public_keys")(check_keys)


class AccountPatch(BaseModel):
    """What an update may change; absent fields stay as they are."""

    password: str | None = Field(
        default=None, min_length=8, max_length=256, description="A new password."
    )
    remove_password: bool = Field(False, description="Keys only from now on.")
    ssh_public_keys: list[str] | None = Field(
        default=None, max_length=100, description="The whole new list of keys."
    )
    enabled: bool | None = Field(default=None, description="A disabled account cannot log in.")

    _keys = field_validator("ssh_public_keys")(check_keys)


class AccountOut(BaseModel):
    name: str
    home: str
    has_password: bool
    ssh_public_keys: list[str]
    enabled: bool
    created_at: datetime


def account_out(account: Account) -> AccountOut:
    return AccountOut(
        name=account.name, home=account.home, has_password=bool(account.password_hash),
        ssh_public_keys=[k for k in account.ssh_public_keys.splitlines() if k],
        enabled=account.enabled, created_at=account.created_at,
    )  # fmt: skip


def check_home_is_its_own(session: Session, home: str, exclude: str | None = None) -> None:
    """Homes never nest nor coincide: an account could otherwise read and write another's
    files (or every account's, with a home of `homes`)."""
    wanted = PurePosixPath(home).parts
    for other in session.exec(select(Account)):
        if other.name == exclude:
            continue
        theirs = PurePosixPath(other.home).parts
        shorter = min(len(wanted), len(theirs))
        if wanted[:shorter] == theirs[:shorter]:
            raise HTTPException(
                422,
                f"home: {home!r} overlaps account {other.name!r}'s home {other.home!r}; "
                "homes may not nest or coincide",
            )


def _get(session: SessionDep, name: str) -> Account:
    account = session.get(Account, name)
    if account is None:
        raise HTTPException(404, f"no account {name!r}")
    return account


@router.post("", status_code=201, response_model=AccountOut)
def create_account(
    body: AccountIn, tm: TMDep, session: SessionDep, audit: AuditDep, response: Response
) -> AccountOut:
    if not body.password and not body.ssh_public_keys:
        raise HTTPException(422, "an account needs a password or at least one SSH key")
    home_relative = body.home or f"homes/{body.name}"
    try:
        home = confined(tm.data_dir, home_relative)
    except PathError as exc:
        raise HTTPException(422, f"home: {exc}") from exc
    if home == tm.data_dir.resolve():
        raise HTTPException(422, "home: an account needs its own folder")
    if session.get(Account, body.name) is not None:
        raise HTTPException(409, f"account {body.name!r} exists")
    check_home_is_its_own(session, relative_to(tm.data_dir, home))
    account = Account(
        name=body.name,
        password_hash=hash_password(body.password) if body.password else None,
        ssh_public_keys="\n".join(body.ssh_public_keys),
        home=relative_to(tm.data_dir, home),
        enabled=body.enabled,
    )
    home.mkdir(parents=True, exist_ok=True)
    session.add(account)
    audit.record(session, "account.create", account.name, after=account)
    config_changed(tm, session)
    session.refresh(account)
    response.headers["Location"] = f"/accounts/{account.name}"
    return account_out(account)


@router.get("", response_model=Page[AccountOut])
def list_accounts(session: SessionDep, paging: PagingDep) -> Page[AccountOut]:
    return page_of(session, select(Account).order_by(col(Account.name)), paging, account_out)


@router.get("/{name}", response_model=AccountOut)
def get_account(name: str, session: SessionDep) -> AccountOut:
    return account_out(_get(session, name))


@router.patch("/{name}", response_model=AccountOut, summary="Rotate password or keys, enable")
def update_account(
    name: str, body: AccountPatch, tm: TMDep, session: SessionDep, audit: AuditDep
) -> AccountOut:
    account = _get(session, name)
    before = account.model_dump(mode="json")
    if body.password is not None and body.remove_password:
        raise HTTPException(422, "give a new password or remove_password, not both")
    if body.password is not None:
        account.password_hash = hash_password(body.password)
    if body.remove_password:
        account.password_hash = None
    if body.ssh_public_keys is not None:
        account.ssh_public_keys = "\n".join(body.ssh_public_keys)
    if body.enabled is not None:
        account.enabled = body.enabled
    if not account.password_hash and not account.ssh_public_keys:
        raise HTTPException(422, "an account needs a password or at least one SSH key")
    session.add(account)
    audit.record(session, "account.update", name, before, account)
    config_changed(tm, session)
    session.refresh(account)
    return account_out(account)


@router.delete("/{name}", status_code=204)
def delete_account(name: str, tm: TMDep, session: SessionDep, audit: AuditDep) -> Response:
    account = _get(session, name)
    if session.exec(select(Route).where(Route.account == name)).first():
        raise HTTPException(409, f"account {name!r} still has routes; delete them first")
    audit.record(session, "account.delete", name, before=account)
    session.delete(account)
    config_changed(tm, session)
    return Response(status_code=204)
