"""The web UI's session on the coordinator's real app (built by its main.py on a SQLite
file; the runtime is not started): pages need a login, the token lives in an HttpOnly
SameSite=Strict cookie, writes need the session's CSRF token and the same origin, the login
page never redirects off-site, and logging out revokes the token."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session

from ferrylink.admin_auth import check_token, create_admin
from ferrylink.db import create_tables
from services.cluster_coordinator.main import app_from
from services.cluster_coordinator.settings import Settings
from services.cluster_coordinator.web.pages import endpoint_state
from services.cluster_coordinator.web.session import COOKIE, csrf_token

PASSWORD = "a-long-test-password"


@pytest.fixture
def app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FastAPI]:
    monkeypatch.setenv("FERRYLINK_DATABASE_URL", f"sqlite:///{tmp_path / 'ferrylink.db'}")
    monkeypatch.setenv("FERRYLINK_STATE_DIR", str(tmp_path / "state"))
    built = app_from(Settings())
    create_tables(built.state.engine)
    with Session(built.state.engine) as session:
        create_admin(session, "root", PASSWORD, "admin")
        session.commit()
    yield built
    built.state.engine.dispose()


def log_in(client: TestClient, password: str = PASSWORD, next_page: str = "/ui/dead") -> str:
    form = {"name": "root", "password": password, "next": next_page}
    response = client.post("/ui/login", data=form, follow_redirects=False)
    assert response.status_code == 303, response.text
    return response.headers["location"]


def test_pages_need_a_login_and_the_cookie_is_http_only(app: FastAPI) -> None:
    client = TestClient(app, follow_redirects=False)
    page = client.get("/ui/transfers")
    assert page.status_code == 303
    assert page.headers["location"] == "/ui/login?next=%2Fui%2Ftransfers"
    assert client.get("/ui/cluster/live").status_code == 401  # the script's polls
    login = client.get("/ui/login")
    assert login.status_code == 200 and 'label for="password"' in login.text
    assert "script-src 'self'" in login.headers["content-security-policy"]
    wrong = client.post("/ui/login", data={"name": "root", "password": "nope"})
    assert wrong.status_code == 401 and "wrong name or password" in wrong.text
    assert COOKIE not in client.cookies

    assert log_in(client) == "/ui/dead"
    cookie = client.cookies.jar
    [entry] = [c for c in cookie if c.name == COOKIE]
    assert entry.path == "/ui" and entry.has_nonstandard_attr("HttpOnly")
    assert entry.get_nonstandard_attr("SameSite") == "strict"
    # The cookie holds a real API token of this admin, valid on every server.
    with Session(app.state.engine) as session:
        principal = check_token(session, entry.value or "")
    assert principal is not None and principal.admin == "root"


def test_the_login_never_sends_anyone_off_site(app: FastAPI) -> None:
    client = TestClient(app, follow_redirects=False)
    assert log_in(client, next_page="https://evil.example/") == "/ui/cluster"
    assert log_in(client, next_page="//evil.example/ui/x") == "/ui/cluster"


def test_writes_need_the_csrf_token_and_the_same_origin(app: FastAPI) -> None:
    client = TestClient(app, follow_redirects=False)
    log_in(client)
    token = client.cookies[COOKIE]
    no_csrf = client.post("/ui/actions/failover", json={"to": "st9"})
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    forged = client.post("/ui/actions/failover", json={"to": "st9"},
                         headers={"X-CSRF-Token": csrf_token(token),
                                  "Origin": "https://evil.example"})  # fmt: skip
    assert forged.status_code == 403 and "cross-origin" in forged.text
    # The real page's token passes the check (the failover itself then needs the API).
    logout = client.post("/ui/logout", headers={"X-CSRF-Token": csrf_token(token),
                                                "Origin": "http://testserver"})  # fmt: skip
    assert logout.status_code == 200 and logout.json()["redirect"] == "/ui/login"
    with Session(app.state.engine) as session:
        assert check_token(session, token) is None  # revoked
    client.cookies.set(COOKIE, token, path="/ui")
    assert client.get("/ui/transfers").status_code == 303


def test_the_tracking_page_and_its_actions_need_a_login_and_the_csrf_token(app: FastAPI) -> None:
    client = TestClient(app, follow_redirects=False)
    assert client.get("/ui/tracking").headers["location"] == "/ui/login?next=%2Fui%2Ftracking"
    assert client.get("/ui/tracking/live").status_code == 401
    log_in(client)
    token = client.cookies[COOKIE]
    no_csrf = client.post("/ui/actions/tracking/t/pause")
    assert no_csrf.status_code == 403 and "CSRF" in no_csrf.text
    headers = {"X-CSRF-Token": csrf_token(token), "Origin": "http://testserver"}
    other = client.post("/ui/actions/tracking/t/delete", headers=headers)
    assert other.status_code == 422  # only pause and resume
    # No cluster runs behind this app: the page says so instead of failing.
    page = client.get("/ui/tracking")
    assert page.status_code == 200 and 'role="alert"' in page.text


@pytest.mark.parametrize(
    ("paused", "failures", "state"),
    [(False, 0, "delivering"), (False, 3, "failing"), (True, 3, "paused"), (True, 0, "paused")],
)
def test_an_endpoints_state_is_paused_failing_or_delivering(
    paused: bool, failures: int, state: str
) -> None:
    assert endpoint_state({"paused": paused, "failures": failures}) == state
