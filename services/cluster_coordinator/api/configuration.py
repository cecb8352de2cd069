"""The cluster's configuration: the ordered servers list, the mode and the timeout."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from pydantic import BaseModel, Field

from ferrylink.admin_auth import OPERATOR_MAY
from ferrylink.audit import AuditDep
from ferrylink.deps import SessionDep
from services.cluster_coordinator import store
from services.cluster_coordinator.api.deps import CoordinatorDep
from services.cluster_coordinator.api.status import ClusterStatus, cluster_status

router = APIRouter(prefix="/cluster", tags=["cluster"])


class ServerIn(BaseModel):
    id: str = Field(min_length=1, max_length=64, examples=["st1"])
    api_url: str = Field(default="", max_length=512, examples=["http://st1:8100"])


class ServersIn(BaseModel):
    servers: list[ServerIn] = Field(description="Ordered: the order decides promotion.")


class SettingsIn(BaseModel):
    mode: str | None = Field(default=None, examples=["passive"])
    connection_timeout: float | None = Field(default=None, gt=0, examples=[5.0])
    auto_sync: bool | None = Field(
        default=None,
        description="Sync a server that starts or comes back by itself (else: POST /cluster/sync).",
    )


@router.put("/servers", response_model=ClusterStatus, summary="Replace the ordered servers list")
def put_servers(
    body: ServersIn, coordinator: CoordinatorDep, session: SessionDep, audit: AuditDep
) -> ClusterStatus:
    entries = [store.ServerEntry(s.id, s.api_url) for s in body.servers]
    before = {"servers": [vars(e) for e in store.read_servers(session)]}
    try:
        store.write_servers(session, entries)
    except store.ConfigError as exc:
        raise HTTPException(422, str(exc)) from exc
    audit.record(session, "cluster.servers", "servers", before, body)
    coordinator.runtime.commit_config_change(session)
    return cluster_status(coordinator, session)


@router.put("/settings", response_model=ClusterStatus, summary="Change mode or timeout")
def put_settings(
    body: SettingsIn, coordinator: CoordinatorDep, session: SessionDep, audit: AuditDep
) -> ClusterStatus:
    current = store.read_settings(session, coordinator.defaults)
    wanted = store.ClusterSettings(
        mode=body.mode if body.mode is not None else current.mode,
        connection_timeout=(
            body.connection_timeout
            if body.connection_timeout is not None
            else current.connection_timeout
        ),
        auto_sync=body.auto_sync if body.auto_sync is not None else current.auto_sync,
    )
    try:
        store.write_settings(session, wanted, coordinator.settings.lease_seconds)
    except store.ConfigError as exc:
        raise HTTPException(422, str(exc)) from exc
    audit.record(session, "cluster.settings", "settings", vars(current), vars(wanted))
    coordinator.runtime.commit_config_change(session)
    return cluster_status(coordinator, session)


class EventsIn(BaseModel):
    paused: bool = Field(description="true: the server takes no more events until resumed.")


@router.put(
    "/servers/{server_id}/events",
    response_model=ClusterStatus,
    summary="Pause or resume one server's event consumption",
    openapi_extra=OPERATOR_MAY,
    description="A paused server finishes the events it holds and takes no more; its other "
    "work (and, as primary, the primary's) goes on. In the passive modes, pausing the primary "
    "stops event processing in the cluster until it is resumed or another server is primary.",
)
def put_server_events(
    server_id: str,
    body: EventsIn,
    coordinator: CoordinatorDep,
    session: SessionDep,
    audit: AuditDep,
) -> ClusterStatus:
    before = {"paused": server_id in store.read_paused(session)}
    try:
        store.set_paused(session, server_id, body.paused)
    except store.ConfigError as exc:
        raise HTTPException(404, str(exc)) from exc
    audit.record(session, "cluster.server.events", server_id, before, body)
    session.commit()
    return cluster_status(coordinator, session)
