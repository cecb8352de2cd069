"""Manual failover (passive_legacy): promote a standby by hand and report what was lost."""

from __future__ import annotations

import time

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from ferrylink.admin_auth import OPERATOR_MAY
from ferrylink.audit import AuditDep
from ferrylink.config import read_sentinel_undelivered
from ferrylink.deps import SessionDep
from ferrylink.tables.cluster import ClusterState
from services.cluster_coordinator import store
from services.cluster_coordinator.api.deps import CoordinatorDep
from services.cluster_coordinator.coordinator import Coordinator

router = APIRouter(prefix="/cluster", tags=["cluster"])


class FailoverIn(BaseModel):
    to: str = Field(min_length=1, description="The server to promote.")


class FailoverReport(BaseModel):
    previous_primary: str | None
    primary: str
    epoch: int
    lost_events: int = Field(description="Events queued on the old primary's own queue.")
    lost_sentinel_records: int = Field(
        description="Transfer states the old primary's sentinel link will never deliver: "
        "queued on its own transfer-states queue, or linked (node-local link data) but not "
        "yet received by some endpoint, as it last reported."
    )


@router.post(
    "/failover",
    response_model=FailoverReport,
    summary="Manual failover (passive_legacy only): promote a standby by hand",
    openapi_extra=OPERATOR_MAY,
    responses={
        404: {"description": "Unknown server"},
        409: {"description": "Refused: automatic mode, server down, or already primary"},
    },
)
def post_failover(
    body: FailoverIn, coordinator: CoordinatorDep, session: SessionDep, audit: AuditDep
) -> FailoverReport:
    now = time.time()
    view = coordinator.view(session, now)
    state = session.get(ClusterState, 1) or ClusterState(id=1)
    if body.to not in {s.id for s in view.servers}:
        raise HTTPException(404, f"unknown server {body.to!r}")
    if view.mode != "passive_legacy":
        raise HTTPException(
            409,
            f"manual failover is refused in {view.mode} mode: promotion is automatic "
            "(only passive_legacy fails over by hand)",
        )
    if body.to == state.primary:
        raise HTTPException(409, f"{body.to} is already the primary")
    if body.to not in view.live:
        raise HTTPException(409, f"{body.to} is down; promote a server that is up")
    previous = state.primary
    store.put_setting(session, store.FAILOVER_REQUEST_KEY, body.to)
    audit.record(session, "cluster.failover", body.to, {"primary": previous}, {"primary": body.to})
    session.commit()
    # The leader applies the request on its next step; wait for it (bounded).
    deadline = time.monotonic() + 10 * coordinator.settings.heartbeat_interval + 5
    while time.monotonic() < deadline:
        session.rollback()  # end the transaction, so the next read sees the leader's commit
        state = session.get(ClusterState, 1, populate_existing=True) or ClusterState(id=1)
        if state.primary == body.to:
            lost_events, queued_states = _stranded_counts(coordinator, previous)
            undelivered = read_sentinel_undelivered(session, previous) if previous else 0
            return FailoverReport(
                previous_primary=previous,
                primary=body.to,
                epoch=state.epoch,
                lost_events=lost_events,
                lost_sentinel_records=queued_states + undelivered,
            )
        time.sleep(0.1)
    raise HTTPException(503, "no coordinator leader applied the failover; is the cluster up?")


def _stranded_counts(coordinator: Coordinator, node: str | None) -> tuple[int, int]:
    """Messages left on the old primary's node-local queues (passive_legacy loses them)."""
    if node is None:
        return 0, 0
    depths = coordinator.runtime.queue_depths(["events", "transfer-states"], node)
    return depths["events"], depths["transfer-states"]
