"""Watched folders: list, create, pause, resume and delete them.

Any server answers (the watches live in the shared database); only the primary polls them.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import func
from sqlmodel import Session, col, delete, select

from ferrylink.audit import AuditDep
from ferrylink.deps import CommitConfigChange, ConfigChangeDep, SessionDep
from ferrylink.paging import Page, PagingDep, page_of
from ferrylink.paths import PathError, relative_to
from ferrylink.tables.accounts import Account
from ferrylink.tables.folders import WatchedFile, WatchedFolder
from services.folder_monitor.api.deps import StoreDep
from services.folder_monitor.monitor import watch_paths

router = APIRouter(prefix="/watches", tags=["watches"])


class WatchIn(BaseModel):
    account: str = Field(min_length=1, max_length=64, description="Whose file.arrived events.")
    path: str = Field(
        min_length=1,
        max_length=1024,
        description="The folder, relative to the data directory (or absolute inside it); "
        "it must exist and lie inside the account's home.",
    )
    pattern: str = Field("*", min_length=1, max_length=255, description="File name pattern.")
    recursive: bool = Field(False, description="Watch sub-folders too.")
    settle_seconds: float = Field(
        2.0, ge=0, le=86400, description="How long size and mtime must stay unchanged."
    )
    enabled: bool = True

    @field_validator("pattern")
    @classmethod
    def _plain_pattern(cls, value: str) -> str:
        return check_plain_pattern(value)


def check_plain_pattern(value: str) -> str:
    if "/" in value or "\\" in value:
        raise ValueError("the pattern matches file names; it may not contain '/'")
    return value


class WatchPatch(BaseModel):
    """What an update may change; absent fields stay as they are. A changed folder or
    pattern starts from a clean slate: the files there are new to the watch."""

    account: str | None = Field(None, min_length=1, max_length=64)
    path: str | None = Field(None, min_length=1, max_length=1024)
    pattern: str | None = Field(None, min_length=1, max_length=255)
    recursive: bool | None = None
    settle_seconds: float | None = Field(None, ge=0, le=86400)
    enabled: bool | None = None


class WatchOut(BaseModel):
    id: int
    account: str
    path: str
    pattern: str
    recursive: bool
    settle_seconds: float
    enabled: bool
    created_at: datetime
    files_tracked: int = Field(description="Files currently in the folder that were seen.")
    files_emitted: int = Field(description="Of those, the ones file.arrived was sent for.")


def _out(watch: WatchedFolder, counts: dict[int, tuple[int, int]]) -> WatchOut:
    assert watch.id is not None
    tracked, emitted = counts.get(watch.id, (0, 0))
    return WatchOut(
        id=watch.id, account=watch.account, path=watch.folder, pattern=watch.pattern,
        recursive=watch.recursive, settle_seconds=watch.settle_seconds, enabled=watch.enabled,
        created_at=watch.created_at, files_tracked=tracked, files_emitted=emitted,
    )  # fmt: skip


def _counts(session: Session, watch_id: int | None = None) -> dict[int, tuple[int, int]]:
    query = select(
        WatchedFile.watch_id, func.count(), func.count(col(WatchedFile.event_id))
    ).group_by(col(WatchedFile.watch_id))
    if watch_id is not None:
        query = query.where(WatchedFile.watch_id == watch_id)
    return {row[0]: (row[1], row[2]) for row in session.exec(query).all()}


def _get(session: Session, watch_id: int) -> WatchedFolder:
    watch = session.get(WatchedFolder, watch_id)
    if watch is None:
        raise HTTPException(404, f"no watch {watch_id}")
    return watch


@router.get("", summary="Every watched folder")
def list_watches(session: SessionDep, paging: PagingDep) -> Page[WatchOut]:
    counts = _counts(session)
    query = select(WatchedFolder).order_by(col(WatchedFolder.id))
    return page_of(session, query, paging, lambda w: _out(w, counts))


def _checked_folder(session: Session, store: StoreDep, account_name: str, path: str) -> str:
    """The folder relative to the data directory, if it exists inside the account's home."""
    account = session.get(Account, account_name)
    if account is None:
        raise HTTPException(422, f"unknown account {account_name!r}")
    try:
        _home, folder = watch_paths(store.data_dir, account.home, path)
    except PathError as exc:
        raise HTTPException(422, str(exc)) from exc
    if not folder.is_dir():
        raise HTTPException(422, f"folder {path!r} does not exist")
    return relative_to(store.data_dir, folder) or "."


@router.post("", status_code=201, summary="Watch a folder (422 with the reason if refused)")
def create_watch(
    body: WatchIn,
    store: StoreDep,
    session: SessionDep,
    audit: AuditDep,
    response: Response,
    commit: ConfigChangeDep,
) -> WatchOut:
    watch = WatchedFolder(
        account=body.account, folder=_checked_folder(session, store, body.account, body.path),
        pattern=body.pattern, recursive=body.recursive, settle_seconds=body.settle_seconds,
        enabled=body.enabled,
    )  # fmt: skip
    session.add(watch)
    session.flush()
    audit.record(session, "watch.create", str(watch.id), after=watch)
    commit(session)
    session.refresh(watch)
    response.headers["Location"] = f"/watches/{watch.id}"
    return _out(watch, {})


@router.patch("/{watch_id}", summary="Change a watched folder (422 with the reason if refused)")
def update_watch(
    watch_id: int,
    body: WatchPatch,
    store: StoreDep,
    session: SessionDep,
    audit: AuditDep,
    commit: ConfigChangeDep,
) -> WatchOut:
    watch = _get(session, watch_id)
    before = watch.model_dump(mode="json")
    change = body.model_dump(exclude_unset=True)
    if any(value is None for value in change.values()):
        raise HTTPException(422, "a field given may not be null; leave it out to keep it")
    try:
        if "pattern" in change:
            check_plain_pattern(change["pattern"])
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    account = change.get("account", watch.account)
    if "account" in change or "path" in change:
        watch.folder = _checked_folder(session, store, account, change.get("path", watch.folder))
        watch.account = account
    for key in ("pattern", "recursive", "settle_seconds", "enabled"):
        if key in change:
            setattr(watch, key, change[key])
    if (watch.account, watch.folder, watch.pattern, watch.recursive) != (
        before["account"],
        before["folder"],
        before["pattern"],
        before["recursive"],
    ):
        # Another set of files: what was seen of the old one says nothing about these.
        session.exec(delete(WatchedFile).where(col(WatchedFile.watch_id) == watch_id))
    session.add(watch)
    audit.record(session, "watch.update", str(watch_id), before, watch)
    commit(session)
    session.refresh(watch)
    return _out(watch, _counts(session, watch_id))


@router.get("/{watch_id}", summary="One watched folder")
def get_watch(watch_id: int, session: SessionDep) -> WatchOut:
    return _out(_get(session, watch_id), _counts(session, watch_id))


def _set_enabled(
    session: Session, audit: AuditDep, commit: CommitConfigChange, watch_id: int, enabled: bool
) -> WatchOut:
    watch = _get(session, watch_id)
    before = watch.model_dump(mode="json")
    watch.enabled = enabled
    session.add(watch)
    audit.record(session, "watch.resume" if enabled else "watch.pause", str(watch_id),
                 before, watch)  # fmt: skip
    commit(session)
    session.refresh(watch)
    return _out(watch, _counts(session, watch_id))


@router.post("/{watch_id}/pause", summary="Stop polling the folder (its state is kept)")
def pause_watch(
    watch_id: int, session: SessionDep, audit: AuditDep, commit: ConfigChangeDep
) -> WatchOut:
    return _set_enabled(session, audit, commit, watch_id, False)


@router.post(
    "/{watch_id}/resume",
    summary="Poll the folder again; files added or changed meanwhile are picked up then",
)
def resume_watch(
    watch_id: int, session: SessionDep, audit: AuditDep, commit: ConfigChangeDep
) -> WatchOut:
    return _set_enabled(session, audit, commit, watch_id, True)


@router.delete("/{watch_id}", status_code=204, summary="Stop watching and forget its state")
def delete_watch(
    watch_id: int, session: SessionDep, audit: AuditDep, commit: ConfigChangeDep
) -> Response:
    watch = _get(session, watch_id)
    audit.record(session, "watch.delete", str(watch_id), before=watch)
    session.delete(watch)
    session.exec(delete(WatchedFile).where(col(WatchedFile.watch_id) == watch_id))
    commit(session)
    return Response(status_code=204)
