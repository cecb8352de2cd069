"""The consolidated transfer log (served by the primary)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel
from sqlmodel import col, select

from ferrylink.deps import SessionDep
from ferrylink.models import Transfer
from ferrylink.paging import Page, PagingDep, page_of
from ferrylink.primary_proxy import forward_to_primary
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
    summary="The consolidated transfer log (any server answers: others ask the primary)",
    responses={503: {"description": "No primary serves it yet"}},
)
def list_transfers(
    request: Request,
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
) -> Page[TransferOut] | Response:
    if not tm.serves_transfer_log.is_set:
        runtime = tm.runtime
        primary = runtime.follower.status()["primary"]
        return forward_to_primary(request, runtime.engine, primary, runtime.settings.node_id,
                                  runtime.service_name)  # fmt: skip
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
