"""Dead letters: parked events with their reason, replayed on request."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field
from sqlmodel import col, select

from ferrylink.audit import AuditDep
from ferrylink.deps import SessionDep
from ferrylink.paging import Page, PagingDep, page_of
from ferrylink.tables.events import DeadEvent
from services.transaction_manager.api.deps import TMDep
from services.transaction_manager.dead_letters import replay

router = APIRouter(prefix="/events/dead", tags=["events"])
DEAD_PREVIEW_BYTES = 512


class DeadOut(BaseModel):
    id: str
    queue: str
    reason: str
    size: int
    preview: str = Field(description=f"The first {DEAD_PREVIEW_BYTES} bytes of the body.")
    dead_at: datetime
    replayed_at: datetime | None


def dead_out(dead: DeadEvent) -> DeadOut:
    return DeadOut(id=dead.id, queue=dead.queue, reason=dead.reason, size=len(dead.body),
                   preview=dead.body[:DEAD_PREVIEW_BYTES].decode(errors="replace"),
                   dead_at=dead.dead_at, replayed_at=dead.replayed_at)  # fmt: skip


@router.get("", response_model=Page[DeadOut])
def list_dead(
    session: SessionDep, paging: PagingDep, include_replayed: bool = False
) -> Page[DeadOut]:
    query = select(DeadEvent).order_by(col(DeadEvent.dead_at).desc(), col(DeadEvent.id))
    if not include_replayed:
        query = query.where(col(DeadEvent.replayed_at).is_(None))
    return page_of(session, query, paging, dead_out)


@router.get("/{dead_id}/body", response_class=Response)
def dead_body(dead_id: str, session: SessionDep) -> Response:
    """The whole body of a dead letter, as it was published."""
    dead = session.get(DeadEvent, dead_id)
    if dead is None:
        raise HTTPException(404, f"no dead letter {dead_id!r}")
    return Response(dead.body, media_type="application/octet-stream")


@router.post("/{dead_id}/replay", response_model=DeadOut)
def replay_dead(dead_id: str, tm: TMDep, session: SessionDep, audit: AuditDep) -> DeadOut:
    dead = replay(tm.runtime.engine, tm.runtime.republish_raw, dead_id)
    if dead is None:
        raise HTTPException(404, f"no dead letter {dead_id!r}")
    shown = dead_out(dead)
    # The body is the partner's data, not configuration: the record names it only.
    summary = {"queue": shown.queue, "reason": shown.reason, "size": shown.size}
    audit.record(session, "dead_letter.replay", dead_id, after=summary)
    session.commit()
    return shown


@router.delete("/{dead_id}", status_code=204, summary="Purge a dead letter (it is dropped)")
def purge_dead(dead_id: str, session: SessionDep, audit: AuditDep) -> Response:
    dead = session.get(DeadEvent, dead_id)
    if dead is None:
        raise HTTPException(404, f"no dead letter {dead_id!r}")
    shown = dead_out(dead)
    summary = {"queue": shown.queue, "reason": shown.reason, "size": shown.size}
    audit.record(session, "dead_letter.purge", dead_id, before=summary)
    session.delete(dead)
    session.commit()
    return Response(status_code=204)
