"""Dead letters: parked events with their reason, replayed on request."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, HTTPException, Query, Request, Response
from pydantic import BaseModel, Field
from sqlmodel import col, select

from ferrylink import audit
from ferrylink.deps import SessionDep
from ferrylink.models import DeadEvent
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


@router.get("", response_model=list[DeadOut])
def list_dead(
    session: SessionDep,
    include_replayed: bool = False,
    limit: int = Query(default=100, ge=1, le=1000),
) -> list[DeadOut]:
    query = select(DeadEvent).order_by(col(DeadEvent.dead_at).desc()).limit(limit)
    if not include_replayed:
        query = query.where(col(DeadEvent.replayed_at).is_(None))
    return [dead_out(d) for d in session.exec(query)]


@router.get("/{dead_id}/body", response_class=Response)
def dead_body(dead_id: str, session: SessionDep) -> Response:
    """The whole body of a dead letter, as it was published."""
    dead = session.get(DeadEvent, dead_id)
    if dead is None:
        raise HTTPException(404, f"no dead letter {dead_id!r}")
    return Response(dead.body, media_type="application/octet-stream")


@router.post("/{dead_id}/replay", response_model=DeadOut)
def replay_dead(dead_id: str, tm: TMDep, session: SessionDep, request: Request) -> DeadOut:
    dead = replay(tm.runtime.engine, tm.runtime.republish_raw, dead_id)
    if dead is None:
        raise HTTPException(404, f"no dead letter {dead_id!r}")
    audit.record(session, request, "dead_letter.replay", dead_id,
                 before={"queue": dead.queue, "reason": dead.reason})  # fmt: skip
    session.commit()
    return dead_out(dead)


@router.delete("/{dead_id}", status_code=204, summary="Purge a dead letter (it is dropped)")
def purge_dead(dead_id: str, session: SessionDep, request: Request) -> Response:
    dead = session.get(DeadEvent, dead_id)
    if dead is None:
        raise HTTPException(404, f"no dead letter {dead_id!r}")
    audit.record(
        session,
        request,
        "dead_letter.purge",
        dead_id,
        before={
            "queue": dead.queue,
            "reason": dead.reason,
            "size": len(dead.body),
            "preview": dead.body[:DEAD_PREVIEW_BYTES].decode(errors="replace"),
        },
    )
    session.delete(dead)
    session.commit()
    return Response(status_code=204)
