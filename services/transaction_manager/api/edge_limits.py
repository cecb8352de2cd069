"""The limits every edge applies: `GET /edge-limits`, `PUT /edge-limits`.

Stored in the shared database (`EdgeLimits`); each login through an edge reads them, so a
change applies to new sessions on every edge without a restart (sessions already running
keep the limits they started with)."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel, Field
from sqlmodel import Session

from ferrylink.audit import AuditDep
from ferrylink.clock import utcnow
from ferrylink.deps import ConfigChangeDep, SessionDep
from ferrylink.tables.transfers import EdgeLimits

router = APIRouter(prefix="/edge-limits", tags=["edge limits"])


class EdgeLimitsBody(BaseModel):
    """0 means no limit."""

    sessions_per_account: int = Field(
        0, ge=0,
        description="Concurrent sessions of one account on one edge (each HTTPS request is a "
        "session).",
    )  # fmt: skip
    idle_timeout_s: int = Field(
        0, ge=0,
        description="An SFTP session with no request for this many seconds is disconnected.",
    )  # fmt: skip
    max_file_bytes: int = Field(0, ge=0, description="Largest file one upload may create.")
    quota_bytes: int = Field(
        0, ge=0, description="Most bytes all files in one account's home may take."
    )


def read_edge_limits(session: Session) -> EdgeLimits:
    return session.get(EdgeLimits, 1) or EdgeLimits()


@router.get("", response_model=EdgeLimitsBody)
def get_edge_limits(session: SessionDep) -> EdgeLimitsBody:
    return EdgeLimitsBody.model_validate(read_edge_limits(session), from_attributes=True)


@router.put("", response_model=EdgeLimitsBody)
def put_edge_limits(
    body: EdgeLimitsBody, session: SessionDep, audit: AuditDep, commit: ConfigChangeDep
) -> EdgeLimitsBody:
    row = session.get(EdgeLimits, 1) or EdgeLimits(id=1)
    before = EdgeLimitsBody.model_validate(row, from_attributes=True).model_dump()
    for name, value in body.model_dump().items():
        setattr(row, name, value)
    row.updated_at = utcnow()
    session.add(row)
    audit.record(session, "edge_limits.update", "edge-limits", before, body)
    commit(session)
    return body
