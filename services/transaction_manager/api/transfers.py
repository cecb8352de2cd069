"""The consolidated transfer log (served by the primary)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel
from sqlmodel import col, select

from ferrylink.deps import SessionDep
from ferrylink.models import Transfer
from ferrylink.paging import Page, PagingDep, page_of
from services.transaction_manager.api.deps import TMDep

router = APIRouter(prefix="/transfers", tags=["transfers"])


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


@router.get(
    "",
    response_model=Page[TransferOut],
    responses={409: {"description": "Not the primary: ask the primary's TM"}},
)
def list_transfers(
    tm: TMDep,
    session: SessionDep,
    paging: PagingDep,
    account: str | None = None,
    status: str | None = None,
    file_name: str | None = Query(default=None, description="Substring of the file name."),
    direction: Literal["inbound", "outbound", "internal"] | None = None,
    cycle_id: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Page[TransferOut]:
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
    query = (
        select(Transfer)
        .where(*filters)
        .order_by(col(Transfer.started_at).desc(), col(Transfer.id).desc())
    )
    return page_of(
        session, query, paging, lambda r: TransferOut.model_validate(r, from_attributes=True)
    )
