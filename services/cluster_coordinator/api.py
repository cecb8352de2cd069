"""HTTP API of the cluster coordinator: the cluster view, its configuration, manual failover."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Request
from pydantic import BaseModel, Field
from sqlmodel import Session

from ferrylink.cluster import Assignment
from ferrylink.models import ClusterSetting, ClusterState
from services.cluster_coordinator import leadership, store
from services.cluster_coordinator.coordinator import Coordinator

router = APIRouter(prefix="/cluster", tags=["cluster"])


def get_coordinator(request: Request) -> Coordinator:
    coordinator: Coordinator = request.app.state.coordinator
    return coordinator


CoordinatorDep = Annotated[Coordinator, Depends(get_coordinator)]


class ServerStatus(BaseModel):
    id: str
    api_url: str
    state: Literal["up", "down"]
    role: Literal["primary", "secondary", "standby"]
    synchronized: bool
    work: list[str]
    services: dict[str, dict[str, Any]]


class ClusterStatus(BaseModel):
    mode: str
    epoch: int
    primary: str | None
    leader: str | None
    connection_timeout: float
    config_version: int
    servers: list[ServerStatus]


class ServerIn(BaseModel):
    id: str = Field(min_length=1, max_length=64, examples=["st1"])
    api_url: str = Field(default="", max_length=512, examples=["http://st1:8100"])


class ServersIn(BaseModel):
    servers: list[ServerIn] = Field(description="Ordered: the order decides promotion.")


class SettingsIn(BaseModel):
    mode: str | None = Field(default=None, examples=["passive"])
    connection_timeout: float | None = Field(default=None, gt=0, examples=[5.0])


class FailoverIn(BaseModel):
    to: str = Field(min_length=1, description="The server to promote.")


class FailoverReport(BaseModel):
    previous_primary: str | None
    primary: str
    epoch: int
    lost_events: int = Field(description="Events queued on the old primary's own queue.")
    lost_sentinel_records: int = Field(
        description="Transfer states queued on the old primary's own transfer-states queue, "
        "plus records its sentinel link had not yet delivered (node-local link data)."
    )


@router.get("", response_model=ClusterStatus, summary="Mode, epoch, primary, leader, servers")
def get_cluster(coordinator: CoordinatorDep) -> ClusterStatus:
    now = time.time()
    with Session(coordinator.runtime.engine) as session:
        view = coordinator.view(session, now)
        state = session.get(ClusterState, 1) or ClusterState(id=1)
        lease = leadership.current_lease(session)
    assignment = _assignment_from(state)
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
                work=assignment.work.get(entry.id, []) if assignment else [],
                services=view.services.get(entry.id, {}),
            )
        )
    return ClusterStatus(
        mode=view.mode,
        epoch=state.epoch,
        primary=state.primary,
        leader=lease.holder if lease and lease.expires_at > now else None,
        connection_timeout=view.connection_timeout,
        config_version=view.config_version,
        servers=servers,
    )


def _assignment_from(state: ClusterState) -> Assignment | None:
    if not state.assignment_json:
        return None
    return Assignment.model_validate_json(state.assignment_json)


@router.get(
    "/assignment",
    response_model=Assignment,
    summary="The current assignment (what runs where, at which epoch)",
    responses={404: {"description": "No assignment issued yet"}},
)
def get_assignment(coordinator: CoordinatorDep) -> Assignment:
    with Session(coordinator.runtime.engine) as session:
        state = session.get(ClusterState, 1)
    assignment = _assignment_from(state) if state else None
    if assignment is None:
        raise HTTPException(404, "no assignment has been issued yet")
    return assignment


@router.put("/servers", response_model=ClusterStatus, summary="Replace the ordered servers list")
def put_servers(body: ServersIn, coordinator: CoordinatorDep) -> ClusterStatus:
    entries = [store.ServerEntry(s.id, s.api_url) for s in body.servers]
    with Session(coordinator.runtime.engine) as session:
        try:
            store.write_servers(session, entries)
        except store.ConfigError as exc:
            raise HTTPException(422, str(exc)) from exc
        session.commit()
    coordinator.runtime.announce_config_change()
    return get_cluster(coordinator)


@router.put("/settings", response_model=ClusterStatus, summary="Change mode or timeout")
def put_settings(body: SettingsIn, coordinator: CoordinatorDep) -> ClusterStatus:
    with Session(coordinator.runtime.engine) as session:
        current = store.read_settings(session, coordinator.defaults)
        wanted = store.ClusterSettings(
            mode=body.mode if body.mode is not None else current.mode,
            connection_timeout=(
                body.connection_timeout
                if body.connection_timeout is not None
                else current.connection_timeout
            ),
        )
        try:
            store.write_settings(session, wanted, coordinator.settings.lease_seconds)
        except store.ConfigError as exc:
            raise HTTPException(422, str(exc)) from exc
        session.commit()
    coordinator.runtime.announce_config_change()
    return get_cluster(coordinator)


@router.post(
    "/failover",
    response_model=FailoverReport,
    summary="Manual failover (passive_legacy only): promote a standby by hand",
    responses={
        404: {"description": "Unknown server"},
        409: {"description": "Refused: automatic mode, server down, or already primary"},
    },
)
def post_failover(body: FailoverIn, coordinator: CoordinatorDep) -> FailoverReport:
    now = time.time()
    with Session(coordinator.runtime.engine) as session:
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
        session.commit()
    # The leader applies the request on its next step; wait for it (bounded).
    deadline = time.monotonic() + 10 * coordinator.settings.heartbeat_interval + 5
    while time.monotonic() < deadline:
        with Session(coordinator.runtime.engine) as session:
            state = session.get(ClusterState, 1, populate_existing=True) or ClusterState(id=1)
        if state.primary == body.to:
            lost_events, lost_records = _stranded_counts(coordinator, previous)
            return FailoverReport(
                previous_primary=previous,
                primary=body.to,
                epoch=state.epoch,
                lost_events=lost_events,
                lost_sentinel_records=lost_records,
            )
        time.sleep(0.1)
    raise HTTPException(503, "no coordinator leader applied the failover; is the cluster up?")


def _stranded_counts(coordinator: Coordinator, node: str | None) -> tuple[int, int]:
    """Messages left on the old primary's node-local queues (passive_legacy loses them)."""
    if node is None:
        return 0, 0
    depths = coordinator.runtime.queue_depths(["events", "transfer-states"], node=node)
    # Plus the records the old primary's sentinel link had linked but not yet delivered to
    # every endpoint: its link data is node-local, so they are lost too. It reports the
    # number to the shared database about every second.
    with Session(coordinator.runtime.engine) as session:
        row = session.get(ClusterSetting, f"sentinel_link.undelivered.{node}")
        undelivered = int(row.value) if row is not None else 0
    return depths["events"], depths["transfer-states"] + undelivered
