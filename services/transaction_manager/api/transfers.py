"""The consolidated transfer log (served by the primary)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel
from sqlmodel import col, select

from ferrylink.audit import AuditDep
from ferrylink.deps import SessionDep
from ferrylink.fencing import Fenced
from ferrylink.paging import Page, PagingDep, page_of
from ferrylink.primary_proxy import forward_to_primary
from ferrylink.tables.transfers import Transfer
from services.transaction_manager import resubmit
from services.transaction_manager.api.deps import TMDep, TransactionManager
from services.transaction_manager.transfer_log import settle

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
    partner: str | None = None,
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
    if partner:
        filters.append(Transfer.partner == partner)
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


def _require_primary(tm: TransactionManager) -> None:
    if not tm.serves_transfer_log.is_set:
        assignment = tm.runtime.follower.status()
        raise HTTPException(
            409, f"the consolidated transfer log is served by the primary "
                 f"({assignment['primary'] or 'none yet'})",
        )  # fmt: skip


class ResubmitOut(BaseModel):
    cycle_id: str
    event_id: str
    from_step: int
    previous_error: str


@router.post(
    "/{cycle_id}/resubmit",
    response_model=ResubmitOut,
    status_code=202,
    summary="Re-run a failed transfer's route from the step where it failed",
    responses={
        404: {"description": "No such cycle"},
        409: {"description": "Not the primary, not failed, or cannot be re-run"},
    },
)
def resubmit_transfer(
    cycle_id: str, tm: TMDep, session: SessionDep, audit: AuditDep
) -> ResubmitOut:
    """Accepted: the event is queued again; the transfer log shows its legs as it runs (the
    failed legs go TO_EXECUTE at once, then the push SENDING/SENT or FAILED again).
    Recorded in the audit log."""
    _require_primary(tm)
    try:
        token = tm.runtime.fence.token()
    except Fenced as exc:
        raise HTTPException(409, f"not the primary: {exc}") from None
    try:
        again = resubmit.prepare(session, cycle_id, tm.transfer_log)
    except resubmit.ResubmitRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    out = ResubmitOut(cycle_id=cycle_id, event_id=again.event.id, from_step=again.failed_step,
                      previous_error=again.detail)  # fmt: skip
    audit.record(session, "transfer.resubmit", cycle_id,
                 before={"route": "FAILED", "detail": again.detail},
                 after=out.model_dump())  # fmt: skip
    # The event goes out through the outbox: queued if and only if the reset committed.
    rows = [tm.runtime.stage(session, again.event)]
    session.flush()
    try:
        # The primary's write: only while this grant is still the database's epoch.
        tm.runtime.fence.check(session, token)
    except Fenced as exc:
        session.rollback()
        raise HTTPException(409, f"not the primary any more: {exc}") from None
    session.commit()
    tm.runtime.send(rows)
    settle([tm.transfer_log.publish(state) for state in again.states])
    return out
