"""Hostile administrator input is refused with the reason: overlapping homes, maintenance
patterns that match everything, rename templates that format too much, partners pointing
at internal addresses, oversized bodies. The services' real apps, in-process; the
transaction manager's runtime runs on the test broker (configuration changes announce)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ferrylink.db import create_tables, make_engine
from ferrylink.destinations import DestinationPolicy, DestinationRefused
from tests.admin_support import admin_headers


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, amqp_url: str, prefix: str) -> str:
    database = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    for name, value in {"DATABASE_URL": database, "DATA_DIR": str(tmp_path / "data"),
                        "STATE_DIR": str(tmp_path), "AMQP_URL": amqp_url,
                        "NAME_PREFIX": prefix}.items():  # fmt: skip
        monkeypatch.setenv(f"FERRYLINK_{name}", value)
    engine = make_engine(database)
    create_tables(engine)
    engine.dispose()
    return database


def _tm(database: str) -> Iterator[TestClient]:
    from services.transaction_manager.main import app_from
    from services.transaction_manager.settings import Settings

    app = app_from(Settings())
    with TestClient(app, headers=admin_headers(make_engine(database))) as client:
        yield client


@pytest.fixture
def tm(env: str) -> Iterator[TestClient]:
    yield from _tm(env)


def refused(response: Any, status: int, reason: str) -> None:
    assert response.status_code == status, response.text
    assert reason in response.text, response.text


def test_account_homes_never_nest_or_coincide(tm: TestClient) -> None:
    assert tm.post("/accounts", json={"name": "acme", "password": "long-enough"}).status_code == 201
    for name, home in (("all", "homes"), ("inner", "homes/acme/sub"), ("same", "homes/acme"),
                       ("dotted", "homes/./acme")):  # fmt: skip
        response = tm.post("/accounts", json={"name": name, "password": "long-enough",
                                               "home": home})  # fmt: skip
        refused(response, 422, "overlaps account 'acme'")
    # A sibling whose name merely starts the same is fine.
    sibling = {"name": "acme2", "password": "long-enough", "home": "homes/acme2"}
    assert tm.post("/accounts", json=sibling).status_code == 201


@pytest.mark.parametrize(
    ("template", "reason"),
    [
        ("{name:>99999999}", "is over 64"),
        ("{name:.1000}", "is over 64"),
        ("{name.__class__}", "no attribute or index access"),
        ("{stem[0]}", "no attribute or index access"),
        ("{name!r}", "no conversions"),
        ("{name:{counter}}", "no nested fields"),
        ("{nope}", "unknown template field"),
        ("{date:" + "%Y" * 20 + "}", "too long"),
        ("{event_id:>64}" * 5, "over 255"),
        ("a/{name}", "path separator"),
    ],
)
def test_rename_templates_are_formatted_safely(tm: TestClient, template: str, reason: str) -> None:
    tm.post("/accounts", json={"name": "acme", "password": "long-enough"})
    route = {"account": "acme", "pattern": "*", "steps": [{"kind": "rename", "template": template}]}
    refused(tm.post("/routes", json=route), 422, reason)


def test_a_usual_template_is_accepted(tm: TestClient) -> None:
    tm.post("/accounts", json={"name": "acme", "password": "long-enough"})
    template = "{date:%Y%m%d}_{counter:06d}_{stem}.{ext}"
    route = {"account": "acme", "pattern": "*", "steps": [{"kind": "rename", "template": template}]}
    assert tm.post("/routes", json=route).status_code == 201


def test_partners_may_not_point_at_internal_addresses(tm: TestClient) -> None:
    sftp = {"protocol": "sftp", "username": "u", "password": "pw", "check_host_key": False}
    for i, host in enumerate(["127.0.0.1", "localhost", "169.254.169.254", "[::1]", "0.0.0.0"]):
        response = tm.post("/partners", json={**sftp, "name": f"p{i}", "host": host})
        refused(response, 422, "denied network")
    metadata = {"name": "meta", "protocol": "http", "url": "http://169.254.169.254/latest/"}
    refused(tm.post("/partners", json=metadata), 422, "denied network")
    creds = {"name": "creds", "protocol": "http", "url": "https://u:p@files.example/"}
    refused(tm.post("/partners", json=creds), 422, "not in the url")
    public = {**sftp, "name": "bank", "host": "203.0.113.7"}
    assert tm.post("/partners", json=public).status_code == 201


def test_the_allow_list_lets_loopback_partners_in(
    env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRYLINK_PARTNER_ALLOW", "127.0.0.1")
    monkeypatch.setenv("FERRYLINK_PARTNER_DENY", "203.0.113.0/24")
    for client in _tm(env):
        sftp = {"protocol": "sftp", "username": "u", "password": "pw", "check_host_key": False}
        assert client.post("/partners", json={**sftp, "name": "a", "host": "127.0.0.1"}
                           ).status_code == 201  # fmt: skip
        refused(client.post("/partners", json={**sftp, "name": "b", "host": "127.0.0.2"}),
                422, "denied network")  # fmt: skip
        refused(client.post("/partners", json={**sftp, "name": "c", "host": "203.0.113.7"}),
                422, "203.0.113.0/24")  # fmt: skip


@pytest.mark.parametrize(
    ("host", "resolves_to", "allow", "refusal"),
    [
        ("10.1.2.3", [], [], None),
        ("127.0.0.1", [], [], "127.0.0.0/8"),
        ("127.0.0.1", [], ["127.0.0.1"], None),
        ("inside.example", ["10.0.0.1", "127.0.0.1"], [], "127.0.0.0/8"),
        ("inside.example", ["127.0.0.1"], ["inside.example"], None),
        ("v6.example", ["fe80::1%eth0"], [], "fe80::/10"),
        ("mapped.example", ["::ffff:127.0.0.1"], [], "::ffff:7f00:0/104"),
        ("nowhere.invalid", OSError, [], None),
    ],
)
def test_destination_rules(host: str, resolves_to: Any, allow: list[str], refusal: str | None
                           ) -> None:  # fmt: skip
    def resolve(_host: str) -> list[str]:
        if resolves_to is OSError:
            raise OSError("does not resolve")
        return list(resolves_to)

    policy = DestinationPolicy(allow=allow, resolve=resolve)
    if refusal is None:
        policy.check_host(host)
    else:
        with pytest.raises(DestinationRefused, match=refusal.replace(".", r"\.")):
            policy.check_host(host)


def test_request_bodies_over_the_limit_are_refused(tm: TestClient) -> None:
    huge = {"name": "acme", "password": "long-enough", "ssh_public_keys": ["x" * (2 << 20)]}
    refused(tm.post("/accounts", json=huge), 413, "over the limit")

    def chunks() -> Iterator[bytes]:
        yield b'{"name": "acme", "password": "'
        for _ in range(40):
            yield b"y" * 65536
        yield b'"}'

    json_type = {"content-type": "application/json"}
    refused(tm.post("/accounts", content=chunks(), headers=json_type), 413, "over the limit")
    assert tm.get("/accounts").json()["items"] == []


def test_maintenance_patterns_cannot_match_everything(env: str, tmp_path: Path) -> None:
    from services.scheduler.main import app_from
    from services.scheduler.settings import Settings

    app = app_from(Settings())
    # Started (with): a created job is a configuration change, announced on the broker.
    with TestClient(app, headers=admin_headers(app.state.engine)) as client:
        job = {"name": "clean", "kind": "temp_file_cleanup", "cron": "0 3 * * *"}
        for patterns in ("*.*", "*", "?*", "*.csv", "*.*,*.part", "[a-z]*.[a-z]*", "*.t*"):
            response = client.post("/jobs", json={**job, "params": {"patterns": patterns}})
            refused(response, 422, "would match every file")
        bad_pattern = {**job, "params": {"patterns": "../*.part"}}
        refused(client.post("/jobs", json=bad_pattern), 422, "'/'")
        refused(client.post("/jobs", json={**job, "params": {"folder": "../.."}}), 422, "'..'")
        ok = client.post("/jobs", json={**job, "params": {"patterns": "*.part,*.tmp,~*"}})
        assert ok.status_code == 201, ok.text
    app.state.engine.dispose()
