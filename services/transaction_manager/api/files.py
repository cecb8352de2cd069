"""Streamed uploads into an account's home. Public to the admin plane: the account itself
authenticates (HTTP Basic), so the app factory includes this router without the admin
token check."""

from __future__ import annotations

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

from ferrylink.events import Event
from ferrylink.models import Account
from ferrylink.passwords import verify_password
from ferrylink.paths import PathError, confined, relative_to
from services.transaction_manager.api.deps import TMDep, TransactionManager
from services.transaction_manager.transfer_log import FAILED, RECEIVED, RECEIVING

router = APIRouter(prefix="/files", tags=["files"])


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
    "/{account}/{path:path}",
    status_code=201,
    response_model=UploadOut,
    summary="Upload a file into the account's home (streamed; HTTP Basic auth)",
)
async def upload(account: str, path: str, request: Request, tm: TMDep) -> UploadOut:
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
    await run_in_threadpool(_record, tm, leg_key, RECEIVED, bytes=size)
    await run_in_threadpool(tm.runtime.publish_event, event)
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


def _record(tm: TransactionManager, leg_key: str, status: str, **fields: Any) -> None:
    with Session(tm.runtime.engine) as session:
        tm.transfer_log.record(session, leg_key, status, **fields)
