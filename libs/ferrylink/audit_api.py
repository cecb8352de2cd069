"""`GET /audit`: the audit log, filtered and paged (every service serves it; the log is in
the shared database)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query
from sqlmodel import col, or_, select

from ferrylink.audit import AuditOut, audit_out
from ferrylink.deps import SessionDep
from ferrylink.paging import Page, PagingDep, page_of
from ferrylink.tables.admin import AuditRecord

router = APIRouter(tags=["audit"])


@router.get("/audit", response_model=Page[AuditOut], summary="Administrative changes, newest first")
def list_audit(
    session: SessionDep,
    paging: PagingDep,
    actor: Annotated[str | None, Query(max_length=64, description="The administrator.")] = None,
    action: Annotated[
        str | None,
        Query(
            max_length=64,
            description="An action (`account.update`), or a resource for all its actions "
            "(`account`).",
        ),
    ] = None,
    target: Annotated[str | None, Query(max_length=255, description="What changed.")] = None,
    since: Annotated[datetime | None, Query(description="At or after this time.")] = None,
    until: Annotated[datetime | None, Query(description="Before this time.")] = None,
) -> Page[AuditOut]:
    filters: list[Any] = []
    if actor:
        filters.append(AuditRecord.actor == actor)
    if action:
        escaped = action.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        filters.append(
            or_(AuditRecord.action == action,
                col(AuditRecord.action).like(f"{escaped}.%", escape="\\"))
        )  # fmt: skip
    if target:
        filters.append(AuditRecord.target == target)
    if since:
        filters.append(col(AuditRecord.at) >= since)
    if until:
        filters.append(col(AuditRecord.at) < until)
    query = (
        select(AuditRecord)
        .where(*filters)
        .order_by(col(AuditRecord.at).desc(), col(AuditRecord.id).desc())
    )
    return page_of(session, query, paging, audit_out)
