"""Routes: which steps run for an account's arrived files matching a pattern."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response
from pydantic import BaseModel, Field
from sqlmodel import col, select

from ferrylink.deps import SessionDep
from ferrylink.models import Account, Partner, Route
from services.transaction_manager.api.deps import TMDep, config_changed
from services.transaction_manager.steps import STEPS, PushStep, Step

router = APIRouter(prefix="/routes", tags=["routes"])


class RouteIn(BaseModel):
    account: str
    pattern: str = Field(min_length=1, max_length=255, examples=["*.csv"])
    position: int = 0
    steps: list[Step] = Field(min_length=1)
    enabled: bool = True


class RouteOut(RouteIn):
    id: int


def route_out(route: Route) -> RouteOut:
    assert route.id is not None
    return RouteOut(
        id=route.id, account=route.account, pattern=route.pattern, position=route.position,
        steps=STEPS.validate_json(route.steps_json), enabled=route.enabled,
    )  # fmt: skip


@router.post("", status_code=201, response_model=RouteOut)
def create_route(body: RouteIn, tm: TMDep, session: SessionDep) -> RouteOut:
    if session.get(Account, body.account) is None:
        raise HTTPException(422, f"unknown account {body.account!r}")
    for step in body.steps:
        if isinstance(step, PushStep) and session.get(Partner, step.partner) is None:
            raise HTTPException(422, f"unknown partner {step.partner!r}")
    route = Route(
        account=body.account, pattern=body.pattern, position=body.position,
        steps_json=STEPS.dump_json(body.steps).decode(), enabled=body.enabled,
    )  # fmt: skip
    session.add(route)
    config_changed(tm, session)
    session.refresh(route)
    return route_out(route)


@router.get("", response_model=list[RouteOut])
def list_routes(session: SessionDep, account: str | None = None) -> list[RouteOut]:
    query = select(Route).order_by(col(Route.account), col(Route.position), col(Route.id))
    if account:
        query = query.where(Route.account == account)
    return [route_out(r) for r in session.exec(query)]


@router.delete("/{route_id}", status_code=204)
def delete_route(route_id: int, tm: TMDep, session: SessionDep) -> Response:
    route = session.get(Route, route_id)
    if route is None:
        raise HTTPException(404, f"no route {route_id}")
    session.delete(route)
    config_changed(tm, session)
    return Response(status_code=204)
