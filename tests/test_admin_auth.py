"""The administration plane's authentication, on every service's real app (built by its
main.py, on a SQLite file; the runtime is not started, so no broker is needed): every
route of every OpenAPI document needs a token, an operator can read but not write, and
tokens live in the shared database."""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session

from ferrylink.db import create_tables, make_engine
from ferrylink.models import ApiToken
from ferrylink.services_registry import BACKEND_SERVICES, module_name
from tests.admin_support import admin_headers

# Routes that answer without an admin token: health for probes, and the logins (an account
# uploading a file authenticates itself; an administrator logs in for a token).
OPEN_ROUTES = {
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("post", "/auth/token"),
    ("put", "/files/{account}/{path}"),
}
READS = {"get", "head", "options"}


@pytest.fixture
def apps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, FastAPI]]:
    database = tmp_path / "ferrylink.db"
    monkeypatch.setenv("FERRYLINK_DATABASE_URL", f"sqlite:///{database}")
    monkeypatch.setenv("FERRYLINK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("FERRYLINK_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("FERRYLINK_NAME_PREFIX", "authtest")
    built = {}
    for service in BACKEND_SERVICES:
        module = importlib.import_module(module_name(service) + ".main")
        settings_module = importlib.import_module(module_name(service) + ".settings")
        built[service] = module.app_from(settings_module.Settings())
    create_tables(next(iter(built.values())).state.engine)
    yield built
    for app in built.values():
        app.state.engine.dispose()


def _operations(app: FastAPI) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method, path, operation)
        for path, item in app.openapi()["paths"].items()
        for method, operation in item.items()
    ]


def _url(path: str, operation: dict[str, Any]) -> str:
    for parameter in operation.get("parameters", []):
        if parameter["in"] == "path":
            kind = parameter.get("schema", {}).get("type")
            path = path.replace("{" + parameter["name"] + "}", "1" if kind == "integer" else "x")
    return path


def test_every_route_of_every_service_needs_a_token_and_operators_cannot_write(
    apps: dict[str, FastAPI],
) -> None:
    engine = next(iter(apps.values())).state.engine
    operator = admin_headers(engine, "olga", "operator")
    walked = 0
    for service, app in apps.items():
        client = TestClient(app, raise_server_exceptions=False)
        operations = _operations(app)
        assert len(operations) > 5, service
        for method, path, operation in operations:
            url = _url(path, operation)
            if (method, path) in OPEN_ROUTES:
                assert "security" not in operation, (service, method, path)
                continue
            walked += 1
            # Declared in the OpenAPI document, so clients and docs know.
            assert operation.get("security") == [{"AdminToken": []}], (service, method, path)
            anonymous = client.request(method, url, json={})
            assert anonymous.status_code == 401, (service, method, path, anonymous.text)
            assert anonymous.headers["www-authenticate"] == "Bearer"
            bogus = client.request(method, url, json={}, headers={"Authorization": "Bearer x"})
            assert bogus.status_code == 401, (service, method, path)
            as_operator = client.request(method, url, json={}, headers=operator)
            if method in READS:
                assert as_operator.status_code not in (401, 403), (service, path, as_operator.text)
            elif operation.get("x-ferrylink-role") == "operator":
                assert as_operator.status_code != 403, (service, method, path)
            else:
                assert as_operator.status_code == 403, (service, method, path, as_operator.text)
                assert "operator role may not change" in as_operator.text
    # The walk covered what the issue counted (31 admin routes) and more.
    assert walked >= 31, walked


def test_the_operator_may_fail_over_by_hand(apps: dict[str, FastAPI]) -> None:
    app = apps["cluster-coordinator"]
    failover = app.openapi()["paths"]["/cluster/failover"]["post"]
    assert failover["x-ferrylink-role"] == "operator"
    operator = admin_headers(app.state.engine, "olga", "operator")
    response = TestClient(app).post("/cluster/failover", json={"to": "st9"}, headers=operator)
    assert response.status_code == 404 and "unknown server" in response.text


def test_a_token_from_one_server_works_on_another_until_it_expires_or_is_revoked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = f"sqlite:///{tmp_path / 'shared.db'}"
    monkeypatch.setenv("FERRYLINK_DATABASE_URL", database)
    monkeypatch.setenv("FERRYLINK_DATA_DIR", str(tmp_path / "data"))
    from services.scheduler.main import app_from as scheduler_app
    from services.scheduler.settings import Settings as SchedulerSettings
    from services.transaction_manager.main import app_from as tm_app
    from services.transaction_manager.settings import Settings as TMSettings

    st1 = tm_app(TMSettings(node_id="st1"))
    create_tables(st1.state.engine)
    st2 = scheduler_app(SchedulerSettings(node_id="st2"))
    admin_headers(st1.state.engine, "root", "admin")
    # Log in on st1; use the token on st2 (another process would see the same rows).
    login = TestClient(st1).post(
        "/auth/token", json={"name": "root", "password": "a-long-test-password"}
    )
    assert login.status_code == 200, login.text
    token = {"Authorization": f"Bearer {login.json()['token']}"}
    other = TestClient(st2)
    assert other.get("/jobs", headers=token).status_code == 200
    assert other.get("/auth/me", headers=token).json()["admin"] == "root"
    # After a "restart": a new app on the same database still accepts it.
    again = scheduler_app(SchedulerSettings(node_id="st2"))
    assert TestClient(again).get("/jobs", headers=token).status_code == 200
    # Wrong password: 401, no token.
    wrong = TestClient(st1).post("/auth/token", json={"name": "root", "password": "nope"})
    assert wrong.status_code == 401
    # Expired: refused.
    engine = make_engine(database)
    with Session(engine) as session:
        row = session.get(ApiToken, login.json()["token_id"])
        assert row is not None
        row.expires_at = datetime.now(UTC) - timedelta(seconds=1)
        session.add(row)
        session.commit()
    assert other.get("/jobs", headers=token).status_code == 401
    # Revoked: refused.
    fresh = admin_headers(engine, "ria", "admin")
    token_id = fresh["Authorization"].split("_")[1]
    assert TestClient(st1).delete(f"/auth/tokens/{token_id}", headers=fresh).status_code == 204
    assert other.get("/jobs", headers=fresh).status_code == 401
    for app in (st1, st2, again):
        app.state.engine.dispose()
    engine.dispose()
