"""Watched folders: list, create, pause, resume and delete them.

Any server answers (the watches live in the shared database); only the primary polls them.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field, field_validator
from sqlalchemy import func
from sqlmodel import Session, col, delete, select

from ferrylink.deps import CommitConfigChange, ConfigChangeDep, SessionDep
from ferrylink.models import Account, WatchedFile, WatchedFolder
from ferrylink.paths import PathError, relative_to
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
        if "/" in value or "\\" in value:
            raise ValueError("the pattern matches file names; it may not contain '/'")
        return value


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
def list_watches(session: SessionDep) -> list[WatchOut]:
    counts = _counts(session)
    watches = session.exec(select(WatchedFolder).order_by(col(WatchedFolder.id))).all()
    return [_out(w, counts) for w in watches]


@router.post("", status_code=201, summary="Watch a folder (422 with the reason if refused)")
def create_watch(
    body: WatchIn, store: StoreDep, session: SessionDep, commit: ConfigChangeDep
) -> WatchOut:
    account = session.get(Account, body.account)
    if account is None:
        raise HTTPException(422, f"unknown account {body.account!r}")
    try:
        _home, folder = watch_paths(store.data_dir, account.home, body.path)
    except PathError as exc:
        raise HTTPException(422, str(exc)) from exc
    if not folder.is_dir():
        raise HTTPException(422, f"folder {body.path!r} does not exist")
    watch = WatchedFolder(
        account=body.account, folder=relative_to(store.data_dir, folder) or ".",
        pattern=body.pattern, recursive=body.recursive, settle_seconds=body.settle_seconds,
        enabled=body.enabled,
    )  # fmt: skip
    session.add(watch)
    commit(session)
    session.refresh(watch)
    return _out(watch, {})


@router.get("/{watch_id}", summary="One watched folder")
def get_watch(watch_id: int, session: SessionDep) -> WatchOut:
    return _out(_get(session, watch_id), _counts(session, watch_id))


def _set_enabled(
    session: Session, commit: CommitConfigChange, watch_id: int, enabled: bool
) -> WatchOut:
    watch = _get(session, watch_id)
    watch.enabled = enabled
    session.add(watch)
    commit(session)
    session.refresh(watch)
    return _out(watch, _counts(session, watch_id))


@router.post("/{watch_id}/pause", summary="Stop polling the folder (its state is kept)")
def pause_watch(watch_id: int, session: SessionDep, commit: ConfigChangeDep) -> WatchOut:
    return _set_enabled(session, commit, watch_id, False)


@router.post(
    "/{watch_id}/resume",
    summary="Poll the folder again; files added or changed meanwhile are picked up then",
)
def resume_watch(watch_id: int, session: SessionDep, commit: ConfigChangeDep) -> WatchOut:
    return _set_enabled(session, commit, watch_id, True)


@router.delete("/{watch_id}", status_code=204, summary="Stop watching and forget its state")
def delete_watch(watch_id: int, session: SessionDep, commit: ConfigChangeDep) -> Response:
    session.delete(_get(session, watch_id))
    session.exec(delete(WatchedFile).where(col(WatchedFile.watch_id) == watch_id))
    commit(session)
    return Response(status_code=204)
