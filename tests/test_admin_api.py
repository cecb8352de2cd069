"""The administration API is complete and consistent: updates for every resource, one error
shape, paging with totals, `Location` on 201, and every change in the audit log (secrets
masked) listed with filters and purged by its maintenance job. The services' real apps,
in-process, on SQLite and the test broker."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from ferrylink.contracts import AuditLogPurge, MaintenanceRun
from ferrylink.db import create_tables, make_engine
from ferrylink.models import AuditRecord
from tests.admin_support import admin_headers

SFTP = {"protocol": "sftp", "host": "203.0.113.7", "username": "u", "password": "first-secret",
        "check_host_key": False}  # fmt: skip


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


@pytest.fixture
def tm(env: str) -> Iterator[TestClient]:
    from services.transaction_manager.main import app_from
    from services.transaction_manager.settings import Settings

    app = app_from(Settings())
    with TestClient(app, headers=admin_headers(make_engine(env))) as client:
        yield client


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert body["error"]["status"] == status and body["error"]["message"], body
    error: dict[str, Any] = body["error"]
    return error


def upload_as(tm: TestClient, account: str, password: str) -> int:
    basic = base64.b64encode(f"{account}:{password}".encode()).decode()
    response = tm.put(f"/files/{account}/probe.txt", content=b"x",
                      headers={"Authorization": f"Basic {basic}"})  # fmt: skip
    return response.status_code


def test_every_error_has_one_shape(tm: TestClient) -> None:
    assert "no account" in error_of(tm.get("/accounts/nobody"), 404)["message"]
    invalid = error_of(tm.post("/accounts", json={"name": "../x", "password": "p"}), 422)
    assert "name" in invalid["message"] and invalid["details"][0]["field"] == "name"
    anonymous = tm.get("/accounts", headers={"Authorization": ""})
    assert "administrator token" in error_of(anonymous, 401)["message"]
    assert error_of(tm.delete("/transfers"), 405)["message"] == "Method Not Allowed"
    assert (
        "over the limit" in error_of(tm.post("/accounts", content=b"x" * (2 << 20)), 413)["message"]
    )
    error_of(tm.get("/routes", params={"limit": 0}), 422)


def test_accounts_rotate_passwords_and_keys_and_are_disabled(tm: TestClient) -> None:
    created = tm.post("/accounts", json={"name": "acme", "password": "old-password"})
    assert created.status_code == 201 and created.headers["location"] == "/accounts/acme"
    assert upload_as(tm, "acme", "old-password") == 201

    rotated = tm.patch("/accounts/acme", json={"password": "new-password"})
    assert rotated.status_code == 200 and rotated.json()["has_password"]
    assert upload_as(tm, "acme", "old-password") == 401
    assert upload_as(tm, "acme", "new-password") == 201

    key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl k"
    keyed = tm.patch("/accounts/acme", json={"ssh_public_keys": [key], "remove_password": True})
    assert keyed.json()["ssh_public_keys"] == [key] and not keyed.json()["has_password"]
    assert upload_as(tm, "acme", "new-password") == 401
    bare = tm.patch("/accounts/acme", json={"ssh_public_keys": []})
    assert "password or at least one SSH key" in error_of(bare, 422)["message"]

    tm.patch("/accounts/acme", json={"password": "third-password", "enabled": False})
    assert upload_as(tm, "acme", "third-password") == 401
    assert tm.patch("/accounts/acme", json={"enabled": True}).json()["enabled"] is True
    assert upload_as(tm, "acme", "third-password") == 201
    assert error_of(tm.patch("/accounts/nobody", json={"enabled": True}), 404)


def test_partners_update_and_are_not_deleted_while_used(tm: TestClient) -> None:
    created = tm.post("/partners", json={**SFTP, "name": "bank"})
    assert created.status_code == 201 and created.headers["location"] == "/partners/bank"
    moved = tm.patch("/partners/bank", json={"host": "203.0.113.8", "port": 2222})
    assert (moved.json()["host"], moved.json()["port"]) == ("203.0.113.8", 2222)
    assert "password" not in moved.json() and moved.json()["has_password"]
    # The merged partner is checked like a new one.
    denied = tm.patch("/partners/bank", json={"host": "127.0.0.1"})
    assert "denied network" in error_of(denied, 422)["message"]
    no_secret = tm.patch("/partners/bank", json={"password": None})
    assert "password or a private key" in error_of(no_secret, 422)["message"]

    tm.post("/accounts", json={"name": "acme", "password": "long-enough"})
    route = tm.post("/routes", json={"account": "acme", "pattern": "*.csv",
                                     "steps": [{"kind": "push", "partner": "bank"}]})  # fmt: skip
    assert route.status_code == 201 and route.headers["location"] == f"/routes/{route.json()['id']}"
    refused = error_of(tm.delete("/partners/bank"), 409)
    assert f"route {route.json()['id']}" in refused["message"]

    replaced = tm.put(f"/routes/{route.json()['id']}",
                      json={"account": "acme", "pattern": "*.xml", "position": 3,
                            "steps": [{"kind": "checksum"}]})  # fmt: skip
    assert replaced.status_code == 200, replaced.text
    assert (replaced.json()["pattern"], replaced.json()["position"]) == ("*.xml", 3)
    unknown = tm.put(f"/routes/{route.json()['id']}",
                     json={"account": "acme", "pattern": "*", "steps": [
                         {"kind": "push", "partner": "nobody"}]})  # fmt: skip
    assert "unknown partner" in error_of(unknown, 422)["message"]
    assert tm.delete("/partners/bank").status_code == 204


def test_lists_page_with_totals(tm: TestClient) -> None:
    for i in range(7):
        assert tm.post("/accounts", json={"name": f"a{i}", "password": "long-enough"}).is_success
    first = tm.get("/accounts", params={"limit": 3}).json()
    assert (first["total"], first["offset"], first["limit"]) == (7, 0, 3)
    assert [a["name"] for a in first["items"]] == ["a0", "a1", "a2"]
    last = tm.get("/accounts", params={"offset": 6, "limit": 3}).json()
    assert last["total"] == 7 and [a["name"] for a in last["items"]] == ["a6"]
    beyond = tm.get("/accounts", params={"offset": 50}).json()
    assert beyond["total"] == 7 and beyond["items"] == []
    for path in ("/partners", "/routes", "/events/dead", "/admins", "/auth/tokens", "/audit"):
        page = tm.get(path).json()
        assert {"total", "offset", "limit", "items"} <= set(page), (path, page)


def test_changes_are_audited_with_secrets_masked(tm: TestClient) -> None:
    tm.post("/partners", json={**SFTP, "name": "bank"})
    tm.patch("/partners/bank", json={"password": "second-secret"})
    tm.patch("/partners/bank", json={"port": 2022})
    tm.post("/accounts", json={"name": "acme", "password": "long-enough"})
    tm.delete("/accounts/acme")

    page = tm.get("/audit", params={"target": "bank"}).json()
    assert page["total"] == 3
    port, rotation, creation = page["items"]  # newest first
    assert creation["action"] == "partner.create" and creation["before"] is None
    assert creation["actor"] == "root" and creation["address"] == "testclient"
    assert creation["after"]["password"] == "***" and creation["after"]["host"] == "203.0.113.7"
    assert rotation["before"]["password"] == "***"
    assert rotation["after"]["password"] == "*** (changed)"
    assert port["after"]["password"] == "***" and port["after"]["port"] == 2022
    raw = json.dumps(tm.get("/audit").json())
    assert "first-secret" not in raw and "second-secret" not in raw
    assert "long-enough" not in raw and "$scrypt" not in raw.lower()

    actions = [r["action"] for r in tm.get("/audit", params={"action": "account"}).json()["items"]]
    assert actions == ["account.delete", "account.create"]
    assert tm.get("/audit", params={"action": "partner.update"}).json()["total"] == 2
    assert tm.get("/audit", params={"actor": "someone-else"}).json()["total"] == 0
    later = (datetime.now(UTC) + timedelta(minutes=1)).isoformat()
    assert tm.get("/audit", params={"since": later}).json()["total"] == 0
    assert tm.get("/audit", params={"until": later}).json()["total"] == 5
    # A refused change writes nothing.
    tm.patch("/partners/bank", json={"host": "127.0.0.1"})
    assert tm.get("/audit").json()["total"] == 5


def test_scheduler_watch_and_job_updates_are_audited(env: str, tmp_path: Path) -> None:
    from services.folder_monitor.main import app_from as monitor_app
    from services.folder_monitor.settings import Settings as MonitorSettings
    from services.scheduler.main import app_from as scheduler_app
    from services.scheduler.settings import Settings as SchedulerSettings

    engine = make_engine(env)
    # Started (with): a configuration change is announced on the broker, so the runtimes run.
    with (
        TestClient(scheduler_app(SchedulerSettings()), headers=admin_headers(engine)) as client,
        TestClient(
            monitor_app(MonitorSettings()), headers=admin_headers(engine, "second")
        ) as monitor,
    ):
        _audited_updates(engine, client, monitor, tmp_path)
    engine.dispose()


def _audited_updates(
    engine: Engine, client: TestClient, monitor: TestClient, tmp_path: Path
) -> None:
    job = {"name": "purge", "kind": "audit_log_purge", "cron": "0 3 * * *"}
    created = client.post("/jobs", json=job)
    assert created.status_code == 201 and created.headers["location"].startswith("/jobs/")
    job_id = created.json()["id"]
    changed = client.patch(
        f"/jobs/{job_id}", json={"interval_seconds": 3600, "params": {"days": 7}}
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["cron"], changed.json()["interval_seconds"]) == (None, 3600)
    assert changed.json()["params"] == {"days": 7}
    bad = client.patch(f"/jobs/{job_id}", json={"params": {"days": 0}})
    assert "days" in error_of(bad, 422)["message"]
    assert (
        "kind" in error_of(client.patch(f"/jobs/{job_id}", json={"kind": "push"}), 422)["message"]
    )
    assert client.post(f"/jobs/{job_id}/pause").json()["enabled"] is False

    home = tmp_path / "data" / "homes" / "acme"
    (home / "in").mkdir(parents=True)
    (home / "out").mkdir()
    with Session(engine) as session:
        from ferrylink.models import Account

        session.add(Account(name="acme", password_hash="x", home="homes/acme"))
        session.commit()
    watch = monitor.post("/watches", json={"account": "acme", "path": "homes/acme/in"})
    assert (
        watch.status_code == 201 and watch.headers["location"] == f"/watches/{watch.json()['id']}"
    )
    moved = monitor.patch(f"/watches/{watch.json()['id']}",
                          json={"path": "homes/acme/out", "settle_seconds": 5})  # fmt: skip
    assert (moved.json()["path"], moved.json()["settle_seconds"]) == ("homes/acme/out", 5)
    outside = monitor.patch(f"/watches/{watch.json()['id']}", json={"path": "homes"})
    error_of(outside, 422)

    trail = client.get("/audit").json()["items"]
    assert [(r["actor"], r["action"]) for r in trail] == [
        ("second", "watch.update"), ("second", "watch.create"), ("root", "job.pause"),
        ("root", "job.update"), ("root", "job.create"),
    ]  # fmt: skip
    assert trail[1]["after"]["folder"] == "homes/acme/in"
    assert trail[0]["before"]["folder"] == "homes/acme/in"
    assert trail[0]["after"]["folder"] == "homes/acme/out"


def test_audit_log_purge_job_removes_old_records(env: str, tmp_path: Path) -> None:
    from services.transaction_manager.scheduled import run_maintenance

    engine = make_engine(env)
    now = datetime.now(UTC)
    with Session(engine) as session:
        for days in (400, 100, 1):
            session.add(AuditRecord(at=now - timedelta(days=days), actor="root",
                                    action="account.update", target=f"{days}"))  # fmt: skip
        session.commit()
    event = MaintenanceRun(job_id=1, job_name="purge", fire_time=now,
                           task=AuditLogPurge(days=30))  # fmt: skip
    run_maintenance(event, engine, tmp_path, "st1")
    with Session(engine) as session:
        kept = [r.target for r in session.exec(select(AuditRecord))]
    assert kept == ["1"]
    engine.dispose()
