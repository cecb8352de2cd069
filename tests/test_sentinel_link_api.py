"""The sentinel link's HTTP API in-process (the real app on SQLite and a real broker, no
coordinator, so it delivers nothing): `/endpoints` and `GET /link`, with admin tokens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from ferrylink.config import read_config_version
from ferrylink.models import SentinelEndpoint
from services.sentinel_link.main import app_from
from services.sentinel_link.settings import Settings
from tests.admin_support import admin_headers


@pytest.fixture
def client(tmp_path: Path, amqp_url: str, prefix: str) -> Iterator[TestClient]:
    settings = Settings(
        node_id="st1",
        amqp_url=amqp_url,
        name_prefix=prefix,
        state_dir=tmp_path,
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'ferrylink.db'}",
        http_port=0,
    )
    app = app_from(settings)
    with TestClient(app) as test_client:
        yield test_client


def headers(client: TestClient, role: str = "admin") -> dict[str, str]:
    return admin_headers(engine(client), name=f"{role}-user", role=role)


def engine(client: TestClient) -> Any:
    app: Any = client.app
    return app.state.runtime.engine


def test_endpoints_create_list_pause_resume_delete(client: TestClient) -> None:
    auth = headers(client)
    version = read_config_version(engine(client))
    created = client.post("/endpoints", headers=auth,
                          json={"name": "tracker", "url": "http://127.0.0.1:9/in",
                                "batch_size": 50, "max_backlog": 1000})  # fmt: skip
    assert created.status_code == 201, created.text
    assert created.headers["Location"] == "/endpoints/tracker"
    body = created.json()
    assert (body["name"], body["batch_size"], body["max_backlog"]) == ("tracker", 50, 1000)
    assert (body["backlog"], body["delivered"], body["dropped"], body["failures"]) == (0, 0, 0, 0)
    assert body["paused"] is False and body["last_error"] is None
    # A configuration change: the version moves, so every server re-reads it.
    assert read_config_version(engine(client)) == version + 1

    fetched = client.get(created.headers["Location"], headers=auth)
    assert fetched.status_code == 200 and fetched.json()["url"] == "http://127.0.0.1:9/in"
    assert [e["name"] for e in client.get("/endpoints", headers=auth).json()["items"]] == [
        "tracker"
    ]

    paused = client.post("/endpoints/tracker/pause", headers=auth)
    assert paused.status_code == 200 and paused.json()["paused"] is True
    with Session(engine(client)) as session:
        row = session.exec(select(SentinelEndpoint)).one()
        assert row.paused is True
    resumed = client.post("/endpoints/tracker/resume", headers=auth)
    assert resumed.status_code == 200 and resumed.json()["paused"] is False

    deleted = client.delete("/endpoints/tracker", headers=auth)
    assert deleted.status_code == 204
    assert client.get("/endpoints/tracker", headers=auth).status_code == 404
    assert client.get("/endpoints", headers=auth).json()["items"] == []
    assert read_config_version(engine(client)) == version + 4


def test_duplicate_name_is_409_and_unknown_names_404(client: TestClient) -> None:
    auth = headers(client)
    first = {"name": "tracker", "url": "http://127.0.0.1:9/a"}
    assert client.post("/endpoints", headers=auth, json=first).status_code == 201
    again = client.post("/endpoints", headers=auth,
                        json={"name": "tracker", "url": "https://other.example/b"})  # fmt: skip
    assert again.status_code == 409 and "exists" in again.json()["error"]["message"]
    # The first one is unchanged.
    assert client.get("/endpoints/tracker", headers=auth).json()["url"] == first["url"]
    for method, path in (("GET", "/endpoints/nope"), ("DELETE", "/endpoints/nope"),
                         ("POST", "/endpoints/nope/pause"),
                         ("POST", "/endpoints/nope/resume")):  # fmt: skip
        response = client.request(method, path, headers=auth)
        assert response.status_code == 404, (method, path)
        assert "nope" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("file:///etc/passwd", "scheme must be http or https"),
        ("http://user:secret@tracker.example/in", "no credentials"),
        ("http://tracker.example/in\r\nX-Evil: 1", "control characters"),
        ("http:///in", "needs a host"),
        ("http://tracker.example:99999/", "not a URL"),
        ("http://tracker.example/#x", "fragment"),
    ],
)
def test_hostile_urls_get_422_with_the_reason(client: TestClient, url: str, reason: str) -> None:
    auth = headers(client)
    refused = client.post("/endpoints", headers=auth, json={"name": "evil", "url": url})
    assert refused.status_code == 422
    assert reason in str(refused.json()["error"]["message"])
    assert client.get("/endpoints", headers=auth).json()["items"] == []


@pytest.mark.parametrize(
    "body",
    [
        {"name": "../x", "url": "http://t.example/"},
        {"name": "", "url": "http://t.example/"},
        {"name": "t", "url": "http://t.example/", "batch_size": 0},
        {"name": "t", "url": "http://t.example/", "max_backlog": 0},
        {"name": "t", "url": "http://t.example/", "max_age_seconds": -1},
        {"name": "t"},
    ],
)
def test_bad_endpoint_bodies_get_422(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/endpoints", headers=headers(client), json=body)
    assert response.status_code == 422, response.text


def test_every_route_needs_a_token_and_writes_need_the_admin_role(client: TestClient) -> None:
    for method, path in (("GET", "/endpoints"), ("GET", "/endpoints/x"), ("GET", "/link"),
                         ("POST", "/endpoints"), ("DELETE", "/endpoints/x"),
                         ("POST", "/endpoints/x/pause")):  # fmt: skip
        assert client.request(method, path).status_code == 401, (method, path)
        bad = {"Authorization": "Bearer not-a-token"}
        assert client.request(method, path, headers=bad).status_code == 401, (method, path)
    operator = headers(client, "operator")
    assert client.get("/endpoints", headers=operator).status_code == 200
    assert client.get("/link", headers=operator).status_code == 200
    denied = client.post("/endpoints", headers=operator,
                         json={"name": "t", "url": "http://t.example/"})  # fmt: skip
    assert denied.status_code == 403
    assert client.get("/endpoints", headers=operator).json()["items"] == []


def test_get_link_reports_mode_database_and_counts(client: TestClient) -> None:
    link = client.get("/link", headers=headers(client))
    assert link.status_code == 200
    doc = link.json()
    assert doc["mode"] == "active_active" and doc["link_db"] == "shared"
    assert doc["node"] == "st1"
    assert (doc["records"], doc["cycles"], doc["undelivered_records"]) == (0, 0, 0)
    assert doc["active"] is False  # no coordinator assigned it the delivery
