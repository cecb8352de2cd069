"""Manual synchronization: every server reloads the whole configuration and reports the
version it runs (the reference's sync from the primary's administration tool)."""

from __future__ import annotations

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from ferrylink.admin_auth import OPERATOR_MAY
from ferrylink.deps import SessionDep
from services.cluster_coordinator.api.deps import CoordinatorDep
from services.cluster_coordinator.api.status import ServerStatus, cluster_status

router = APIRouter(prefix="/cluster", tags=["cluster"])


class SyncReport(BaseModel):
    config_version: int = Field(description="The configuration version every server should run.")
    complete: bool = Field(description="Every live server reported that version in time.")
    servers: list[ServerStatus]


@router.post(
    "/sync",
    response_model=SyncReport,
    summary="Make every server reload the whole configuration; report the version each runs",
    openapi_extra=OPERATOR_MAY,
)
def post_sync(
    coordinator: CoordinatorDep,
    session: SessionDep,
    timeout: float = Query(15.0, gt=0, le=120, description="Seconds to wait for the reports."),
) -> SyncReport:
    version, complete = coordinator.sync(timeout)
    session.rollback()  # read the view after the sync, not from a transaction before it
    status = cluster_status(coordinator, session)
    return SyncReport(config_version=version, complete=complete, servers=status.servers)
