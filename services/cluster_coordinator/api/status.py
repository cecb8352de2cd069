"""The cluster view (servers, roles, primary, leader) and the current assignment."""

from __future__ import annotations

import time
from typing import Any, Literal

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field
from sqlmodel import Session

from ferrylink.cluster import Assignment
from ferrylink.deps import SessionDep
from ferrylink.fencing import read_db_time
from ferrylink.tables.cluster import ClusterState
from services.cluster_coordinator import leadership, store
from services.cluster_coordinator.api.deps import CoordinatorDep
from services.cluster_coordinator.coordinator import (
    Coordinator,
    primary_work_held,
    stored_assignment,
)

router = APIRouter(prefix="/cluster", tags=["cluster"])


class ServerStatus(BaseModel):
    id: str
    api_url: str
    state: Literal["up", "down"]
    role: Literal["primary", "secondary", "standby"]
    synchronized: bool
    events_paused: bool = Field(
        description="An operator paused its event consumption (its other work goes on)."
    )
    config_version: int | None = Field(
        description="The oldest configuration version its services run (0: never synced)."
    )
    work: list[str]
    services: dict[str, dict[str, Any]]


class ClusterStatus(BaseModel):
    mode: str
    epoch: int
    primary: str | None
    leader: str | None
    connection_timeout: float
    auto_sync: bool
    config_version: int
    out_of_sync: list[str] = Field(description="Live servers not on the current configuration.")
    primary_work_waits_for: list[str] = Field(
        default_factory=list,
        description="A handover under way: what the primary's primary-only work waits for "
        "(other servers' primary-only work still running, the old primary's services not yet "
        'on the current epoch), as "server/service: ..." texts.',
    )
    servers: list[ServerStatus]


def cluster_status(coordinator: Coordinator, session: Session) -> ClusterStatus:
    now = time.time()
    view = coordinator.view(session, now)
    state = session.get(ClusterState, 1) or ClusterState(id=1)
    lease = leadership.current_lease(session)
    assignment = stored_assignment(state)
    servers = []
    for entry in view.servers:
        if entry.id == state.primary:
            role: Literal["primary", "secondary", "standby"] = "primary"
        elif view.mode == "active_active":
            role = "secondary"
        else:
            role = "standby"
        servers.append(
            ServerStatus(
                id=entry.id,
                api_url=entry.api_url,
                state="up" if entry.id in view.live else "down",
                role=role,
                synchronized=entry.id in view.synchronized,
                events_paused=entry.id in view.paused,
                config_version=_oldest_version(view.services.get(entry.id, {})),
                work=assignment.work.get(entry.id, []) if assignment else [],
                services=view.services.get(entry.id, {}),
            )
        )
    return ClusterStatus(
        mode=view.mode,
        epoch=state.epoch,
        primary=state.primary,
        leader=lease.holder if lease and lease.expires_at > read_db_time(session) else None,
        connection_timeout=view.connection_timeout,
        auto_sync=view.auto_sync,
        config_version=view.config_version,
        out_of_sync=[s.id for s in view.servers if s.id in view.live - view.synchronized],
        primary_work_waits_for=(
            view.handover_waits_for(
                assignment.primary,
                store.read_setting(session, store.HANDOVER_FROM_KEY) or None,
                assignment.epoch,
            )
            if assignment is not None and primary_work_held(assignment)
            else []
        ),
        servers=servers,
    )


def _oldest_version(services: dict[str, dict[str, Any]]) -> int | None:
    versions = [int(s["config_version"]) for s in services.values()]
    return min(versions) if versions else None


@router.get("", response_model=ClusterStatus, summary="Mode, epoch, primary, leader, servers")
def get_cluster(coordinator: CoordinatorDep, session: SessionDep) -> ClusterStatus:
    return cluster_status(coordinator, session)


@router.get(
    "/assignment",
    response_model=Assignment,
    summary="The current assignment (what runs where, at which epoch)",
    responses={404: {"description": "No assignment issued yet"}},
)
def get_assignment(session: SessionDep) -> Assignment:
    state = session.get(ClusterState, 1)
    assignment = stored_assignment(state) if state else None
    if assignment is None:
        raise HTTPException(404, "no assignment has been issued yet")
    return assignment
