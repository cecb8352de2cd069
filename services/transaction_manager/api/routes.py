"""Routes: which steps run for an account's arrived files matching a pattern."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field
from sqlmodel import Session, col, select

from ferrylink.audit import AuditDep
from ferrylink.deps import SessionDep
from ferrylink.paging import Page, PagingDep, page_of
from ferrylink.tables.accounts import Account, Partner
from ferrylink.tables.transfers import Route
from services.transaction_manager.api.deps import TMDep, config_changed
from services.transaction_manager.steps import STEPS, PushStep, Step

router = APIRouter(prefix="/routes", tags=["routes"])


class RouteIn(BaseModel):
    account: str
    pattern: str = Field(min_length=1, max_length=255, examples=["*.csv"])
    position: int = 0
    steps: list[Step] = Field(min_length=1, max_length=100)
    enabled: bool = True


class RouteOut(RouteIn):
    id: int


def route_out(route: Route) -> RouteOut:
    assert route.id is not None
    return RouteOut(
        id=route.id, account=route.account, pattern=route.pattern, position=route.position,
        steps=STEPS.validate_json(route.steps_json), enabled=route.enabled,
    )  # fmt: skip


def _check_references(session: Session, body: RouteIn) -> None:
    if session.get(Account, body.account) is None:
        raise HTTPException(422, f"unknown account {body.account!r}")
    for step in body.steps:
        if isinstance(step, PushStep) and session.get(Partner, step.partner) is None:
            raise HTTPException(422, f"unknown partner {step.partner!r}")


def _get(session: Session, route_id: int) -> Route:
    route = session.get(Route, route_id)
    if route is None:
        raise HTTPException(404, f"no route {route_id}")
    return route


@router.post("", status_code=201, response_model=RouteOut)
def create_route(
    body: RouteIn, tm: TMDep, session: SessionDep, audit: AuditDep, response: Response
) -> RouteOut:
    _check_references(session, body)
    route = Route(
        account=body.account, pattern=body.pattern, position=body.position,
        steps_json=STEPS.dump_json(body.steps).decode(), enabled=body.enabled,
    )  # fmt: skip
    session.add(route)
    session.flush()  # the id names the route in the audit record
    audit.record(session, "route.create", str(route.id), after=route)
    config_changed(tm, session)
    session.refresh(route)
    response.headers["Location"] = f"/routes/{route.id}"
    return route_out(route)


@router.get("", response_model=Page[RouteOut])
def list_routes(
    session: SessionDep, paging: PagingDep, account: str | None = None
) -> Page[RouteOut]:
    query = select(Route).order_by(col(Route.account), col(Route.position), col(Route.id))
    if account:
        query = query.where(Route.account == account)
    return page_of(session, query, paging, route_out)


@router.get("/{route_id}", response_model=RouteOut)
def get_route(route_id: int, session: SessionDep) -> RouteOut:
    return route_out(_get(session, route_id))


@router.put("/{route_id}", response_model=RouteOut, summary="Replace a route")
def replace_route(
    route_id: int, body: RouteIn, tm: TMDep, session: SessionDep, audit: AuditDep
) -> RouteOut:
    route = _get(session, route_id)
    _check_references(session, body)
    before = route.model_dump(mode="json")
    route.account, route.pattern, route.position = body.account, body.pattern, body.position
    route.steps_json = STEPS.dump_json(body.steps).decode()
    route.enabled = body.enabled
    session.add(route)
    audit.record(session, "route.update", str(route_id), before, route)
    config_changed(tm, session)
    session.refresh(route)
    return route_out(route)


@router.delete("/{route_id}", status_code=204)
def delete_route(route_id: int, tm: TMDep, session: SessionDep, audit: AuditDep) -> Response:
    route = _get(session, route_id)
    audit.record(session, "route.delete", str(route_id), before=route)
    session.delete(route)
    config_changed(tm, session)
    return Response(status_code=204)
