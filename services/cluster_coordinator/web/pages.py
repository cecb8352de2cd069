"""The web UI's routes: pages (full HTML), live fragments the script polls, and the
confirmed actions (JSON). Public to the API's bearer check: the session cookie is checked
here instead (session.py)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import parse_qs, quote, urlencode

from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse
from pydantic import BaseModel, Field, ValidationError
from sqlmodel import Session

from ferrylink.admin_api import LoginIn, authenticate, client_address
from ferrylink.contracts import WORK_EVENTS, WORK_EVENTS_LOCAL, TransferStatus
from ferrylink.deps import EngineDep, SessionDep
from ferrylink.login_guard import LoginGuard
from ferrylink.tables.admin import ApiToken
from services.cluster_coordinator.api.deps import CoordinatorDep
from services.cluster_coordinator.api.status import cluster_status
from services.cluster_coordinator.coordinator import Coordinator
from services.cluster_coordinator.web import backend
from services.cluster_coordinator.web.session import (
    COOKIE,
    COOKIE_PATH,
    LoginRequired,
    WebDep,
    WebSession,
    WriteDep,
    current,
    same_origin,
)

if TYPE_CHECKING:
    from fastapi.templating import Jinja2Templates

HERE = Path(__file__).parent
STATIC = {"ui.js": "text/javascript", "ui.css": "text/css"}
PAGE_SIZE = 25
LIVE_INTERVAL_MS = 1500
SECURITY_HEADERS = {
    # Only our own script and style: an injected <script> or inline handler never runs.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer makes browsers send `Origin: null`
    "Cache-Control": "no-store",
}

router = APIRouter(tags=["web"], include_in_schema=False)


@cache
def templates() -> Jinja2Templates:
    """The page templates, loaded on the first page served: a coordinator whose UI nobody
    opens need not hold Jinja2 (~2 MB)."""
    from fastapi.templating import Jinja2Templates

    return Jinja2Templates(directory=HERE / "templates")


def _render(
    request: Request, template: str, status_code: int = 200, **context: Any
) -> HTMLResponse:
    response = templates().TemplateResponse(request, template, context, status_code=status_code)
    response.headers.update(SECURITY_HEADERS)
    return response


def login_redirect(request: Request) -> Response:
    """What a request without a valid session gets (registered by `install`)."""
    if request.url.path.endswith("/live") or request.method != "GET":
        return JSONResponse({"detail": "log in again"}, status_code=401)
    return RedirectResponse(f"/ui/login?{urlencode({'next': request.url.path})}", 303)


# -- static files and login ---------------------------------------------------------------------


@router.get("/ui/static/{name}")
def static(name: str) -> Response:
    if name not in STATIC:
        raise HTTPException(404, "no such file")
    return FileResponse(HERE / "static" / name, media_type=STATIC[name],
                        headers={"Cache-Control": "no-cache"})  # fmt: skip


def _safe_next(value: str) -> str:
    """Only our own pages: never an open redirect to another site."""
    return value if value.startswith("/ui/") and not value.startswith("/ui//") else "/ui/cluster"


@router.get("/ui", response_class=HTMLResponse)
@router.get("/ui/", response_class=HTMLResponse)
def home() -> Response:
    return RedirectResponse("/ui/cluster", 303)


@router.get("/ui/login", response_class=HTMLResponse)
def login_page(request: Request, session: SessionDep, next: str = "/ui/cluster") -> Response:
    if current(request, session) is not None:
        return RedirectResponse(_safe_next(next), 303)
    return _render(request, "login.html", next=_safe_next(next), error="", name="")


@router.post("/ui/login", response_class=HTMLResponse)
async def log_in(request: Request, engine: EngineDep, coordinator: CoordinatorDep) -> Response:
    same_origin(request)
    form = {k: v[0] for k, v in parse_qs((await request.body()).decode(errors="replace")).items()}
    name, next_page = form.get("name", ""), _safe_next(form.get("next", ""))
    guard: LoginGuard = request.app.state.login_guard
    try:
        body = LoginIn(name=name, password=form.get("password", ""), description="web UI",
                       ttl_hours=coordinator.settings.web_token_hours)  # fmt: skip
        issued = await authenticate(engine, guard, client_address(request), body)
    except ValidationError:
        return _render(request, "login.html", 422, next=next_page, name=name,
                       error="Enter your name and password.")  # fmt: skip
    except HTTPException as exc:
        return _render(request, "login.html", exc.status_code, next=next_page, name=name,
                       error=str(exc.detail))  # fmt: skip
    response = RedirectResponse(next_page, 303)
    response.set_cookie(
        COOKIE, issued.token, max_age=int(coordinator.settings.web_token_hours * 3600),
        path=COOKIE_PATH, httponly=True, samesite="strict",
        secure=request.url.scheme == "https",
    )  # fmt: skip
    return response


@router.post("/ui/logout")
def log_out(web: WriteDep, session: SessionDep) -> Response:
    """Revokes the session's token (it is a real API token) and drops the cookie."""
    row = session.get(ApiToken, web.principal.token_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = datetime.now().astimezone()
        session.add(row)
        session.commit()
    response = JSONResponse({"ok": True, "message": "logged out", "redirect": "/ui/login"})
    response.delete_cookie(COOKIE, path=COOKIE_PATH)
    return response


# -- cluster ------------------------------------------------------------------------------------


def _event_consumption(paused: bool, work: list[str]) -> str:
    """What the cluster page says of a server's event consumption."""
    if paused:
        return "paused"
    return "consuming" if {WORK_EVENTS, WORK_EVENTS_LOCAL} & set(work) else "-"


def _cluster_context(coordinator: Coordinator, session: Session) -> dict[str, Any]:
    status = cluster_status(coordinator, session)
    servers = [s.id for s in status.servers]
    try:
        queues: list[backend.QueueRow] | None = backend.QUEUES.get(coordinator, servers)
        queue_error = ""
    except Exception as exc:  # the broker: shown on the page, not a failed page
        queues, queue_error = None, f"broker unreachable: {exc}"
    rows = []
    for server in status.servers:
        ages = [s["age"] for s in server.services.values()]
        versions = sorted({s["config_version"] for s in server.services.values()})
        rows.append({
            "server": server,
            "age": min(ages) if ages else None,
            "versions": versions,
            "events": _event_consumption(server.events_paused, server.work),
            "services": [
                {"name": name, "up": info["age"] <= status.connection_timeout, **info}
                for name, info in sorted(server.services.items())
            ],
        })  # fmt: skip
    return {
        "status": status,
        "rows": rows,
        "queues": queues,
        "queue_error": queue_error,
        "edges": backend.edges(coordinator),
        "now": time.time(),
    }


@router.get("/ui/cluster", response_class=HTMLResponse)
def cluster_page(request: Request, web: WebDep, coordinator: CoordinatorDep,
                 session: SessionDep) -> Response:  # fmt: skip
    return _render(
        request,
        "cluster.html",
        web=web,
        page="cluster",
        interval=LIVE_INTERVAL_MS,
        **_cluster_context(coordinator, session),
    )


@router.get("/ui/cluster/live", response_class=HTMLResponse)
def cluster_live(request: Request, web: WebDep, coordinator: CoordinatorDep,
                 session: SessionDep) -> Response:  # fmt: skip
    return _render(request, "cluster_live.html", **_cluster_context(coordinator, session))


class FailoverIn(BaseModel):
    to: str = Field(min_length=1, max_length=64)


@router.post("/ui/actions/failover")
def failover(body: FailoverIn, web: WriteDep, coordinator: CoordinatorDep) -> JSONResponse:
    """Through the coordinator's own API (its role check: operators may fail over)."""
    response = backend.call("POST", f"{coordinator.settings.api_url}/cluster/failover",
                            web.headers, json=body.model_dump(),
                            timeout=backend.FAILOVER_TIMEOUT)  # fmt: skip
    if response.status_code != 200:
        return _failed(response)
    report = response.json()
    return _done(
        f"Failover done: {report['previous_primary'] or 'none'} → {report['primary']} "
        f"(epoch {report['epoch']}). Lost with the old primary's own queues: "
        f"{report['lost_events']} queued events, {report['lost_sentinel_records']} "
        "transfer states for the tracking system.",
        report,
    )


class EventsIn(BaseModel):
    server: str = Field(min_length=1, max_length=64)
    paused: bool


@router.post("/ui/actions/events")
def pause_or_resume(body: EventsIn, web: WriteDep, coordinator: CoordinatorDep) -> JSONResponse:
    """Pause or resume one server's event consumption (operators may)."""
    response = backend.call("PUT", f"{coordinator.settings.api_url}/cluster/servers/"
                            f"{quote(body.server, safe='')}/events", web.headers,
                            json={"paused": body.paused})  # fmt: skip
    if response.status_code != 200:
        return _failed(response)
    verb = "paused" if body.paused else "resumed"
    return _done(f"Event consumption of {body.server} {verb}.", response.json())


@router.post("/ui/actions/sync")
def sync(web: WriteDep, coordinator: CoordinatorDep) -> JSONResponse:
    """Manual synchronization: every server reloads the whole configuration."""
    response = backend.call("POST", f"{coordinator.settings.api_url}/cluster/sync",
                            web.headers, timeout=backend.SYNC_TIMEOUT)  # fmt: skip
    if response.status_code != 200:
        return _failed(response)
    report = response.json()
    behind = [s["id"] for s in report["servers"] if s["state"] == "up" and not s["synchronized"]]
    outcome = (
        "every live server runs it"
        if report["complete"] and not behind
        else (f"not yet in sync: {', '.join(behind) or 'some servers did not report in time'}")
    )
    return _done(f"Sync to configuration version {report['config_version']}: {outcome}.", report)


# -- file tracking ------------------------------------------------------------------------------


class Search(BaseModel):
    file_name: str = Field("", max_length=255)
    account: str = Field("", max_length=64)
    partner: str = Field("", max_length=64)
    status: str = Field("", max_length=16)
    since: str = Field("", max_length=32)
    until: str = Field("", max_length=32)
    page: int = Field(1, ge=1, le=100_000)

    def params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            k: v
            for k, v in {
                "file_name": self.file_name,
                "account": self.account,
                "partner": self.partner,
                "status": self.status,
                "since": self.since,
                "until": self.until,
            }.items()
            if v
        }
        return params

    def link(self, page: int) -> str:
        return "?" + urlencode({**self.params(), "page": page})


def _search(request: Request) -> tuple[Search, str]:
    try:
        return Search(**dict(request.query_params)), ""
    except ValidationError as exc:
        return Search(), "; ".join(f"{e['loc'][0]}: {e['msg']}" for e in exc.errors())


@router.get("/ui/transfers", response_class=HTMLResponse)
def transfers_page(request: Request, web: WebDep, coordinator: CoordinatorDep,
                   session: SessionDep) -> Response:  # fmt: skip
    search, error = _search(request)
    page: dict[str, Any] = {"total": 0, "items": []}
    searched = bool(search.params()) or "page" in request.query_params
    if searched and not error:
        try:
            url = backend.primary_tm(coordinator, session)
            response = backend.call(
                "GET",
                f"{url}/transfers",
                web.headers,
                params={
                    **search.params(),
                    "limit": PAGE_SIZE,
                    "offset": (search.page - 1) * PAGE_SIZE,
                },
            )
            if response.status_code == 200:
                page = response.json()
            else:
                error = backend.error_of(response)
        except backend.Unavailable as exc:
            error = str(exc)
    first = (search.page - 1) * PAGE_SIZE
    return _render(request, "transfers.html", web=web, page="transfers", search=search,
                   statuses=[s.value for s in TransferStatus], result=page, error=error,
                   searched=searched, first=first, page_size=PAGE_SIZE)  # fmt: skip


def _journey(web: WebSession, coordinator: Coordinator, session: Session,
             cycle_id: str) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
    try:
        url = backend.primary_tm(coordinator, session)
        response = backend.call("GET", f"{url}/transfers", web.headers,
                                params={"cycle_id": cycle_id, "limit": 1000})  # fmt: skip
    except backend.Unavailable as exc:
        return [], str(exc)
    if response.status_code != 200:
        return [], backend.error_of(response)
    legs: list[dict[str, Any]] = response.json()["items"]
    order = {"receive": 0, "route": 2}
    legs.sort(key=lambda leg: (order.get(leg["leg"], 1), leg["leg"], leg["id"]))
    return legs, ""


@router.get("/ui/transfers/{cycle_id}", response_class=HTMLResponse)
def journey_page(cycle_id: str, request: Request, web: WebDep, coordinator: CoordinatorDep,
                 session: SessionDep) -> Response:  # fmt: skip
    legs, error = _journey(web, coordinator, session, cycle_id)
    return _render(request, "journey.html", web=web, page="transfers", cycle_id=cycle_id,
                   legs=legs, error=error, interval=LIVE_INTERVAL_MS)  # fmt: skip


@router.get("/ui/transfers/{cycle_id}/live", response_class=HTMLResponse)
def journey_live(cycle_id: str, request: Request, web: WebDep, coordinator: CoordinatorDep,
                 session: SessionDep) -> Response:  # fmt: skip
    legs, error = _journey(web, coordinator, session, cycle_id)
    return _render(request, "journey_live.html", cycle_id=cycle_id, legs=legs, error=error)


@router.post("/ui/actions/transfers/{cycle_id}/resubmit")
def resubmit(cycle_id: str, web: WriteDep, coordinator: CoordinatorDep,
             session: SessionDep) -> JSONResponse:  # fmt: skip
    url = backend.primary_tm(coordinator, session)
    response = backend.call("POST", f"{url}/transfers/{cycle_id}/resubmit", web.headers)
    if response.status_code != 202:
        return _failed(response)
    out = response.json()
    return _done(
        f"Resubmitted: the route runs again from step {out['from_step']} "
        f"(it had failed with: {out['previous_error'] or 'no detail'}).",
        out,
    )


# -- dead letters -------------------------------------------------------------------------------


def _primary_items(web: WebSession, coordinator: Coordinator, session: Session, service: str,
                   path: str) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
    """The first page of a list the primary's `service` serves at `path`, or why not."""
    try:
        url = backend.primary_service(coordinator, session, service)
        response = backend.call("GET", f"{url}{path}", web.headers)
    except backend.Unavailable as exc:
        return [], str(exc)
    if response.status_code != 200:
        return [], backend.error_of(response)
    items: list[dict[str, Any]] = response.json()["items"]
    return items, ""


def _dead(web: WebSession, coordinator: Coordinator, session: Session
          ) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
    return _primary_items(web, coordinator, session, backend.TM, "/events/dead")


@router.get("/ui/dead", response_class=HTMLResponse)
def dead_page(request: Request, web: WebDep, coordinator: CoordinatorDep,
              session: SessionDep) -> Response:  # fmt: skip
    dead, error = _dead(web, coordinator, session)
    return _render(request, "dead.html", web=web, page="dead", dead=dead, error=error,
                   interval=5000)  # fmt: skip


@router.get("/ui/dead/live", response_class=HTMLResponse)
def dead_live(request: Request, web: WebDep, coordinator: CoordinatorDep,
              session: SessionDep) -> Response:  # fmt: skip
    dead, error = _dead(web, coordinator, session)
    return _render(request, "dead_live.html", dead=dead, error=error)


@router.get("/ui/dead/{dead_id}/body")
def dead_body(dead_id: str, web: WebDep, coordinator: CoordinatorDep,
              session: SessionDep) -> Response:  # fmt: skip
    """The whole body, as a download: hostile bytes are never rendered as a page."""
    url = backend.primary_tm(coordinator, session)
    response = backend.call("GET", f"{url}/events/dead/{dead_id}/body", web.headers)
    if response.status_code != 200:
        raise HTTPException(response.status_code, backend.error_of(response))
    return Response(response.content, media_type="application/octet-stream", headers={
        "Content-Disposition": f'attachment; filename="dead-letter-{dead_id[:64]}.bin"',
        **SECURITY_HEADERS})  # fmt: skip


@router.post("/ui/actions/dead/{dead_id}/replay")
def replay(dead_id: str, web: WriteDep, coordinator: CoordinatorDep,
           session: SessionDep) -> JSONResponse:  # fmt: skip
    url = backend.primary_tm(coordinator, session)
    response = backend.call("POST", f"{url}/events/dead/{dead_id}/replay", web.headers)
    if response.status_code != 200:
        return _failed(response)
    return _done(f"Replayed {dead_id}: it is on {response.json()['queue']} again.",
                 response.json())  # fmt: skip


@router.post("/ui/actions/dead/{dead_id}/purge")
def purge(dead_id: str, web: WriteDep, coordinator: CoordinatorDep,
          session: SessionDep) -> JSONResponse:  # fmt: skip
    url = backend.primary_tm(coordinator, session)
    response = backend.call("DELETE", f"{url}/events/dead/{dead_id}", web.headers)
    if response.status_code != 204:
        return _failed(response)
    return _done(f"Purged {dead_id}.", {})


# -- tracking endpoints ------------------------------------------------------------------------
# Asked of the primary's sentinel link: in passive_legacy its link data (backlogs) is its own.


def _endpoints(web: WebSession, coordinator: Coordinator, session: Session
               ) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
    endpoints, error = _primary_items(web, coordinator, session, backend.SENTINEL_LINK,
                                      "/endpoints")  # fmt: skip
    for endpoint in endpoints:
        endpoint["state"] = endpoint_state(endpoint)
        for name in ("last_success_at", "last_error_at"):
            endpoint[name] = _utc(endpoint[name])
    return endpoints, error


def endpoint_state(endpoint: dict[str, Any]) -> str:
    """What an operator needs first: paused, failing (failures in a row), or delivering."""
    if endpoint["paused"]:
        return "paused"
    return "failing" if endpoint["failures"] else "delivering"


def _utc(epoch: float | None) -> str:
    if epoch is None:
        return "never"
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


@router.get("/ui/tracking", response_class=HTMLResponse)
def tracking_page(request: Request, web: WebDep, coordinator: CoordinatorDep,
                  session: SessionDep) -> Response:  # fmt: skip
    endpoints, error = _endpoints(web, coordinator, session)
    return _render(request, "tracking.html", web=web, page="tracking", endpoints=endpoints,
                   error=error, interval=LIVE_INTERVAL_MS)  # fmt: skip


@router.get("/ui/tracking/live", response_class=HTMLResponse)
def tracking_live(request: Request, web: WebDep, coordinator: CoordinatorDep,
                  session: SessionDep) -> Response:  # fmt: skip
    endpoints, error = _endpoints(web, coordinator, session)
    return _render(request, "tracking_live.html", endpoints=endpoints, error=error)


@router.post("/ui/actions/tracking/{name}/{action}")
def pause_or_resume_endpoint(name: str, action: Literal["pause", "resume"], web: WriteDep,
                             coordinator: CoordinatorDep, session: SessionDep
                             ) -> JSONResponse:  # fmt: skip
    url = backend.primary_service(coordinator, session, backend.SENTINEL_LINK)
    response = backend.call("POST", f"{url}/endpoints/{quote(name, safe='')}/{action}",
                            web.headers)  # fmt: skip
    if response.status_code != 200:
        return _failed(response)
    done = "Paused" if action == "pause" else "Resumed"
    return _done(f"{done} {name}.", response.json())


# -- results ------------------------------------------------------------------------------------


def _done(message: str, detail: dict[str, Any]) -> JSONResponse:
    return JSONResponse({"ok": True, "message": message, "detail": detail})


def _failed(response: Any) -> JSONResponse:
    status = response.status_code if 400 <= response.status_code < 600 else 502
    return JSONResponse({"ok": False, "message": f"Refused: {backend.error_of(response)}"},
                        status_code=status)  # fmt: skip


def install(app: Any) -> None:
    """The handlers the UI needs on the app: no session → login; a service unreachable →
    a clear message (JSON for the script)."""

    async def on_login_required(request: Request, exc: LoginRequired) -> Response:
        return login_redirect(request)

    async def on_unavailable(request: Request, exc: backend.Unavailable) -> Response:
        return JSONResponse({"ok": False, "message": f"Unavailable: {exc}"}, status_code=503)

    app.add_exception_handler(LoginRequired, on_login_required)
    app.add_exception_handler(backend.Unavailable, on_unavailable)
