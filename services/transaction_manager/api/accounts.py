"""Accounts: partners' logins (password and/or SSH keys) and their homes."""

from __future__ import annotations

import re
from datetime import datetime
from pathlib import PurePosixPath

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field, field_validator
from sqlmodel import Session, select

from ferrylink.deps import SessionDep
from ferrylink.models import Account, Route
from ferrylink.passwords import hash_password
from ferrylink.paths import PathError, confined, relative_to
from services.transaction_manager.api.deps import TMDep, check_name, config_changed

SSH_KEY = re.compile(r"^(ssh-(ed25519|rsa|dss)|ecdsa-sha2-nistp\d+|sk-\S+) [A-Za-z0-9+/=]+( .*)?$")

router = APIRouter(prefix="/accounts", tags=["accounts"])


class AccountIn(BaseModel):
    name: str = Field(examples=["acme"])
    password: str | None = Field(default=None, min_length=8, max_length=256)
    ssh_public_keys: list[str] = Field(default_factory=list)
    home: str | None = Field(default=None, description="Relative to the data directory.")

    _name = field_validator("name")(check_name)

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
def create_account(body: AccountIn, tm: TMDep, session: SessionDep) -> AccountOut:
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
    )
    home.mkdir(parents=True, exist_ok=True)
    session.add(account)
    config_changed(tm, session)
    session.refresh(account)
    return account_out(account)


@router.get("", response_model=list[AccountOut])
def list_accounts(session: SessionDep) -> list[AccountOut]:
    return [account_out(a) for a in session.exec(select(Account).order_by(Account.name))]


@router.get("/{name}", response_model=AccountOut)
def get_account(name: str, session: SessionDep) -> AccountOut:
    return account_out(_get(session, name))


@router.delete("/{name}", status_code=204)
def delete_account(name: str, tm: TMDep, session: SessionDep) -> Response:
    account = _get(session, name)
    if session.exec(select(Route).where(Route.account == name)).first():
        raise HTTPException(409, f"account {name!r} still has routes; delete them first")
    session.delete(account)
    config_changed(tm, session)
    return Response(status_code=204)
