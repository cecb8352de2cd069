"""Streamed uploads into an account's home. Public to the admin plane: the account itself
authenticates (HTTP Basic), so the app factory includes this router without the admin
token check."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import secrets
from pathlib import Path
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from pydantic import BaseModel
from sqlmodel import Session
from starlette.concurrency import run_in_threadpool

from ferrylink.admin_api import LoginGuardDep, client_address, guarded_refusal
from ferrylink.contracts import FileArrived
from ferrylink.faults import fault_point
from ferrylink.login_guard import LoginGuard, LoginRefused
from ferrylink.paths import PathError, confined, relative_to
from services.transaction_manager.api.deps import TMDep, TransactionManager
from services.transaction_manager.logins import verify_login
from services.transaction_manager.transfer_log import FAILED, RECEIVED, RECEIVING, settle

router = APIRouter(prefix="/files", tags=["files"])


class UploadOut(BaseModel):
    event_id: str
    cycle_id: str
    account: str
    path: str
    bytes: int


UNAUTHORIZED = HTTPException(
    401, "authentication failed", headers={"WWW-Authenticate": 'Basic realm="ferrylink"'}
)


def _basic_credentials(request: Request) -> tuple[str, str]:
    header = request.headers.get("authorization", "")
    if not header.lower().startswith("basic "):
        raise UNAUTHORIZED
    try:
        user, _, password = base64.b64decode(header[6:]).decode().partition(":")
    except (ValueError, UnicodeDecodeError):
        raise UNAUTHORIZED from None
    return user, password


def _verify(tm: TransactionManager, account_name: str, user: str, password: str,
            address: str) -> Path | None:  # fmt: skip
    """The account's home if the password is right (logins.verify_login: the same KDF cost
    for every failure, each failure logged with the client address)."""
    with Session(tm.runtime.engine) as session:
        account = verify_login(session, user, address, "http", password=password)
    if account is None or account.name != account_name:
        return None
    return confined(tm.data_dir, account.home)


async def authenticate_account(
    tm: TransactionManager, guard: LoginGuard, request: Request, account: str
) -> Path:
    """HTTP Basic auth of the account itself, behind the failed-login defender: the same
    answer for every failure, delayed; 429 while the address or the account is banned."""
    address = client_address(request)
    user, password = _basic_credentials(request)
    try:
        guard.check(address, account)
    except LoginRefused as exc:
        raise guarded_refusal(exc) from None
    home = await run_in_threadpool(_verify, tm, account, user, password, address)
    if home is None:
        await asyncio.sleep(guard.failed(address, account))
        raise UNAUTHORIZED
    guard.succeeded(address, account)
    return home


@router.put(
    "/{account}/{path:path}",
    status_code=201,
    response_model=UploadOut,
    summary="Upload a file into the account's home (streamed; HTTP Basic auth)",
)
async def upload(
    account: str, path: str, request: Request, tm: TMDep, guard: LoginGuardDep
) -> UploadOut:
    # Blocking work (the KDF, the database, the broker) runs in the thread pool; only the
    # body streaming runs on the event loop, a chunk at a time, never the whole file.
    home = await authenticate_account(tm, guard, request, account)
    target, relative = _upload_target(home, path)
    event = FileArrived(account=account, path=relative, protocol="http")
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


def _upload_target(home: Path, path: str) -> tuple[Path, str]:
    try:
        target = confined(home, path)
    except PathError as exc:
        raise HTTPException(400, str(exc)) from exc
    if target == home or path.endswith("/"):
        raise HTTPException(400, "give a file name")
    return target, relative_to(home, target)


def _received(tm: TransactionManager, leg_key: str, event: FileArrived) -> None:
    """RECEIVED and the file's event in one transaction (the event in the outbox), then
    published: a crash or a failed publish after the commit delays routing, never skips it."""
    with Session(tm.runtime.engine, expire_on_commit=False) as session:
        staged = tm.transfer_log.stage(session, leg_key, RECEIVED, bytes=event.size or 0)
        row = tm.runtime.stage(session, event)
        session.commit()
    fault_point("after-received-before-publish")
    if staged is not None:
        # On the queue before the event that routes the file is: the tracking system gets
        # RECEIVED before ROUTED (the outbox has it anyway if the broker does not answer).
        settle([tm.transfer_log.publish(staged)])
    tm.runtime.send([row])


def _record(tm: TransactionManager, leg_key: str, status: str, **fields: Any) -> None:
    with Session(tm.runtime.engine) as session:
        tm.transfer_log.record(session, leg_key, status, **fields)
