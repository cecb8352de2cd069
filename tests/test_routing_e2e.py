"""End to end: files uploaded with curl are routed through every step kind to a real SFTP
server and a real HTTP endpoint, and the transfer log tells each file's story."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from ferrylink.cluster import WORK_EVENTS, WORK_TRANSFER_LOG
from tests.cluster_support import Cluster
from tests.helpers import wait_until
from tests.http_sink import HttpSink
from tests.sftp_server import SftpServer, generate_client_key

pytestmark = [pytest.mark.timeout(300)]


def upload(base: str, account: str, password: str, local: Path, remote: str) -> dict[str, Any]:
    result = subprocess.run(
        ["curl", "-sS", "-f", "-u", f"{account}:{password}", "-T", str(local),
         f"{base}/files/{account}/{remote}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(httpx.Response(200, content=result.stdout).json())


def legs(cluster: Cluster, base: str, cycle_id: str) -> dict[str, dict[str, Any]]:
    page = cluster.http.get(f"{base}/transfers", params={"cycle_id": cycle_id}).json()
    return {item["leg"]: item for item in page["items"]}


def test_every_step_kind_against_real_partners(
    make_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The test partners listen on loopback, which partners may not use unless allowed.
    monkeypatch.setenv("FERRYLINK_PARTNER_ALLOW", "127.0.0.1")
    private_key, public_key = generate_client_key()
    with SftpServer(tmp_path / "sftp", authorized_keys=[public_key]) as sftp, \
            HttpSink(tmp_path / "http") as sink:  # fmt: skip
        (sftp.root / "inbox").mkdir()
        cluster: Cluster = make_cluster("active_active", servers=1)
        wait_until(
            lambda: (
                {WORK_EVENTS, WORK_TRANSFER_LOG} <= cluster.active("st1", "transaction-manager")
            ),
            30,
            "TM working",
        )
        base = f"http://127.0.0.1:{cluster.port('st1', 'transaction-manager')}"
        created = cluster.http.post(
            f"{base}/accounts", json={"name": "acme", "password": "correct horse"}
        )
        assert created.status_code == 201, created.text
        partners = [
            {"name": "bank", "protocol": "sftp", "host": sftp.host, "port": sftp.port,
             "username": "partner", "private_key": private_key, "remote_folder": "/inbox",
             "host_key": sftp.host_key_line},
            {"name": "tracker", "protocol": "http", "url": sink.url},
        ]  # fmt: skip
        for partner in partners:
            response = cluster.http.post(f"{base}/partners", json=partner)
            assert response.status_code == 201, response.text
            assert "private_key" not in response.json() and "password" not in response.json()
        routes = [
            {"account": "acme", "pattern": "*.csv", "position": 1, "steps": [
                {"kind": "checksum", "algorithm": "sha256", "expected": "event"},
                {"kind": "rename", "template": "{date:%Y%m%d}-{counter}-{name}"},
                {"kind": "copy", "folder": "archive"},
                {"kind": "push", "partner": "bank", "remote_name": "{stem}.{ext}"},
                {"kind": "push", "partner": "tracker"},
                {"kind": "delete"},
            ]},
            {"account": "acme", "pattern": "*.bad", "position": 2, "steps": [
                {"kind": "checksum", "algorithm": "md5", "expected": "0" * 32},
                {"kind": "push", "partner": "bank"},
            ]},
        ]  # fmt: skip
        for route in routes:
            response = cluster.http.post(f"{base}/routes", json=route)
            assert response.status_code == 201, response.text

        payload = tmp_path / "orders.csv"
        payload.write_bytes(b"order,amount\n" + b"42,1.00\n" * 50_000)
        sent = upload(base, "acme", "correct horse", payload, "orders.csv")

        # pushed to the SFTP partner (temporary name renamed away) and the HTTP endpoint
        sftp_file = wait_until(
            lambda: next(sftp.root.glob("inbox/*orders.csv"), None), 30, "the SFTP delivery"
        )
        assert sftp_file.read_bytes() == payload.read_bytes()
        assert [p.name for p in (sftp.root / "inbox").iterdir()] == [sftp_file.name]
        http_file = wait_until(
            lambda: next((tmp_path / "http").glob("*orders.csv"), None), 30, "the HTTP delivery"
        )
        assert http_file.read_bytes() == payload.read_bytes()
        # renamed ({date}-{counter}-{name}), archived, then deleted from the home
        archived = list((cluster.state_dir / "data" / "archive").iterdir())
        assert [a.name.split("-", 1)[1] for a in archived] == ["1-orders.csv"]
        assert sftp_file.name == archived[0].name
        home = cluster.state_dir / "data" / "homes" / "acme"
        wait_until(lambda: not any(home.iterdir()), 30, "the delete step")

        story = wait_until(lambda: (found := legs(cluster, base, sent["cycle_id"]))
                           and found.get("route", {}).get("status") == "ROUTED" and found,
                           30, "the transfer log")  # fmt: skip
        assert story["receive"]["status"] == "RECEIVED"
        assert story["receive"]["protocol"] == "http"
        assert (
            story["push:3"]["status"],
            story["push:3"]["protocol"],
            story["push:3"]["partner"],
        ) == ("SENT", "sftp", "bank")
        assert (story["push:4"]["status"], story["push:4"]["protocol"]) == ("SENT", "http")
        assert story["push:3"]["bytes"] == payload.stat().st_size
        assert story["push:3"]["direction"] == "outbound"

        # A bad checksum fails the transfer before anything is pushed.
        bad = tmp_path / "x.bad"
        bad.write_text("tampered")
        failed = upload(base, "acme", "correct horse", bad, "x.bad")
        cycle = failed["cycle_id"]
        route_leg = wait_until(lambda: legs(cluster, base, cycle).get("route", {})
                               .get("status") == "FAILED" and legs(cluster, base, cycle),
                               30, "the failed transfer")  # fmt: skip
        assert "md5 mismatch" in route_leg["route"]["detail"]
        assert "push:1" not in route_leg
        assert not (sftp.root / "inbox" / "x.bad").exists()
        assert (home / "x.bad").read_text() == "tampered"  # the file stays for the operator


def test_api_rejects_bad_configuration(make_cluster: Any) -> None:
    cluster: Cluster = make_cluster("active_active", servers=1)
    base = f"http://127.0.0.1:{cluster.port('st1', 'transaction-manager')}"
    wait_until(lambda: httpx.get(f"{base}/readyz").status_code == 200, 30)

    def refused(method: str, path: str, body: dict[str, Any], status: int, text: str) -> None:
        response = cluster.http.request(method, f"{base}{path}", json=body)
        assert response.status_code == status, response.text
        assert text in response.text, response.text

    # A real process refuses a request without the admin token.
    anonymous = httpx.post(f"{base}/accounts", json={"name": "a", "password": "longenough"})
    assert anonymous.status_code == 401 and "administrator token" in anonymous.text
    refused("POST", "/accounts", {"name": "a"}, 422, "password or at least one SSH key")
    refused("POST", "/accounts", {"name": "../x", "password": "longenough"}, 422, "letters")
    refused(
        "POST",
        "/accounts",
        {"name": "a", "password": "longenough", "home": "../../etc"},
        422,
        "'..'",
    )
    refused(
        "POST",
        "/accounts",
        {"name": "a", "ssh_public_keys": ["not a key"]},
        422,
        "OpenSSH public key",
    )
    refused(
        "POST",
        "/partners",
        {"name": "p", "protocol": "sftp", "host": "h", "username": "u", "password": "pw"},
        422,
        "host_key",
    )
    refused(
        "POST", "/partners", {"name": "p", "protocol": "http", "url": "ftp://x"}, 422, "http://"
    )
    refused("POST", "/partners", {"name": "p", "protocol": "gopher"}, 422, "protocol")
    assert (
        cluster.http.post(
            f"{base}/accounts", json={"name": "a", "password": "longenough"}
        ).status_code
        == 201
    )
    refused("POST", "/accounts", {"name": "a", "password": "longenough"}, 409, "exists")
    refused(
        "POST",
        "/routes",
        {"account": "zz", "pattern": "*", "steps": [{"kind": "delete"}]},
        422,
        "unknown account",
    )
    refused("POST", "/routes", {"account": "a", "pattern": "*", "steps": []}, 422, "steps")
    refused(
        "POST",
        "/routes",
        {"account": "a", "pattern": "*", "steps": [{"kind": "copy", "folder": "../out"}]},
        422,
        "'..'",
    )
    refused(
        "POST",
        "/routes",
        {"account": "a", "pattern": "*", "steps": [{"kind": "rename", "template": "{nope}"}]},
        422,
        "unknown template field",
    )
    refused(
        "POST",
        "/routes",
        {"account": "a", "pattern": "*", "steps": [{"kind": "push", "partner": "ghost"}]},
        422,
        "unknown partner",
    )
    refused(
        "POST",
        "/routes",
        {"account": "a", "pattern": "*", "steps": [{"kind": "teleport"}]},
        422,
        "teleport",
    )
    # Secrets never come back.
    assert cluster.http.post(f"{base}/partners", json={
        "name": "p", "protocol": "sftp", "host": "h", "username": "u", "password": "hunter2",
        "check_host_key": False}).status_code == 201  # fmt: skip
    listed = cluster.http.get(f"{base}/partners").text
    assert "hunter2" not in listed and '"has_password":true' in listed
    log = (cluster.state_dir / "logs" / "st1-transaction-manager.log").read_text()
    assert "hunter2" not in log and "longenough" not in log
