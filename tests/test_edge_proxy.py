"""The edge proxy driven by OpenSSH's `sftp` (batch mode) and `curl`, against a real local
cluster: one server, one edge, the demo account `ferrylink up` creates."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from ferrylink_ops.processes import pid_alive
from tests.edge_support import (
    curl,
    demo,
    demo_home,
    https_url,
    sftp,
    sftp_with_password,
    status_and_body,
)
from tests.helpers import wait_until


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_sftp_and_https_through_the_edge(make_cluster: Any, tmp_path: Path) -> None:
    cluster = make_cluster("active_active", servers=1)
    doc = cluster.doc()
    [edge] = doc["edges"]
    assert edge["id"] == "edge1" and pid_alive(edge["pid"])
    info = demo(cluster)
    assert Path(info["password_file"]).stat().st_mode & 0o077 == 0
    assert Path(info["key_file"] + ".pub").read_text().startswith("ssh-ed25519 ")
    home = demo_home(cluster)
    archive = cluster.state_dir / "data" / "archive"

    # -- SFTP: put, ls, mkdir, rename, get, rm, rmdir (public-key login) --------------------
    source = _file(tmp_path / "orders.csv", 300_000)
    back = tmp_path / "back.csv"
    result = sftp(cluster, f"put {source}\nls -l\n")
    assert result.returncode == 0, result.stderr
    assert "orders.csv" in result.stdout
    # The demo route copies each upload to `archive`, once, under the uploaded name. (Wait
    # for it before renaming: a file renamed before its route ran is parked as missing.)
    wait_until(lambda: (archive / "orders.csv").exists(), 60, "the archive copy")
    assert _sha(archive / "orders.csv") == _sha(source)
    result = sftp(cluster, f"mkdir in\nrename orders.csv in/o.csv\nls in\nget in/o.csv {back}\n")
    assert result.returncode == 0, result.stderr
    assert "in/o.csv" in result.stdout
    assert _sha(back) == _sha(source)
    assert _sha(home / "in" / "o.csv") == _sha(source)

    result = sftp(cluster, "rm in/o.csv\nrmdir in\nls\n")
    assert result.returncode == 0, result.stderr
    assert not (home / "in").exists()

    # -- a path escape is refused, and nothing lands outside the home ------------------------
    result = sftp(cluster, f"put {source} ../../escape.csv\n")
    assert result.returncode != 0
    assert "Permission denied" in result.stderr
    assert not list(cluster.state_dir.rglob("escape.csv"))

    # -- password login: a wrong one is refused, the right one works ------------------------
    result = sftp_with_password(cluster, "not-the-password", "ls\n")
    assert result.returncode != 0 and "Permission denied" in result.stderr
    password = Path(info["password_file"]).read_text().strip()
    result = sftp_with_password(cluster, password, "ls\n")
    assert result.returncode == 0, result.stderr
    tm_log = (cluster.state_dir / "logs" / "st1-transaction-manager.log").read_text()
    assert "failed password login for account 'demo' from 127.0.0.1 over sftp" in tm_log
    assert password not in tm_log and "not-the-password" not in tm_log

    # -- resumed upload: the client dies mid-put, `reput` completes the file -----------------
    big = _file(tmp_path / "big.bin", 6_000_000)
    client = subprocess.Popen(
        ["sftp", "-l", "8000", "-i", info["key_file"],
         "-o", f"UserKnownHostsFile={info['known_hosts']}", "-P", str(edge["sftp_port"]),
         "-b", "-", "demo@127.0.0.1"],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert client.stdin is not None
    client.stdin.write(f"put {big}\n".encode())
    client.stdin.close()

    def uploading() -> bool:
        parts = [p for p in home.glob(".big.bin.*.part") if p.stat().st_size > 500_000]
        return bool(parts)

    wait_until(uploading, 30, "the upload to be under way")
    client.send_signal(signal.SIGKILL)
    client.wait(10)
    partial = home / ".big.bin.partial"
    wait_until(partial.exists, 30, "the interrupted upload to be kept as a partial")
    assert 0 < partial.stat().st_size < big.stat().st_size
    assert not (home / "big.bin").exists()  # never under its name while incomplete
    result = sftp(cluster, "ls\n")
    assert "big.bin" not in result.stdout  # not listed either
    result = sftp(cluster, f"reput {big}\nls -l\n")
    assert result.returncode == 0, result.stderr
    assert _sha(home / "big.bin") == _sha(big)
    assert not partial.exists()
    wait_until(lambda: (archive / "big.bin").exists(), 30, "the resumed file's archive copy")
    assert _sha(archive / "big.bin") == _sha(big)

    # -- HTTPS: curl upload, list, download, delete; Basic auth and a session token ----------
    status, body = status_and_body(curl(cluster, "-T", str(source), https_url(cluster, "web/")))
    assert status == 201, body
    assert json.loads(body)["bytes"] == source.stat().st_size
    assert _sha(home / "web" / "orders.csv") == _sha(source)
    status, body = status_and_body(curl(cluster, https_url(cluster, "web/")))
    assert status == 200 and [e["name"] for e in json.loads(body)["entries"]] == ["orders.csv"]
    download = tmp_path / "download.csv"
    status, _ = status_and_body(curl(cluster, "-o", str(download),
                                     https_url(cluster, "web/orders.csv")))  # fmt: skip
    assert status == 200 and _sha(download) == _sha(source)

    status, body = status_and_body(
        curl(cluster, "-u", "demo:wrong-password", "-T", str(source), https_url(cluster, "x.csv"),
             auth=False)
    )  # fmt: skip
    assert status == 401 and "authentication failed" in body
    assert not (home / "x.csv").exists()
    status, body = status_and_body(
        curl(cluster, "--path-as-is", "-T", str(source), https_url(cluster, "../../escape.csv"))
    )
    assert status == 403 and "may not contain '..'" in body
    assert not list(cluster.state_dir.rglob("escape.csv"))

    status, body = status_and_body(
        curl(cluster, "-X", "POST", https_url(cluster, "").replace("/files/", "/session"))
    )
    assert status == 200, body
    token = json.loads(body)["token"]
    bearer = ["-H", f"Authorization: Bearer {token}"]
    status, body = status_and_body(curl(cluster, *bearer, "-T", str(source),
                                        https_url(cluster, "t.csv"), auth=False))  # fmt: skip
    assert status == 201, body
    status, _ = status_and_body(curl(cluster, *bearer, "-X", "DELETE",
                                     https_url(cluster, "t.csv"), auth=False))  # fmt: skip
    assert status == 204 and not (home / "t.csv").exists()
    status, _ = status_and_body(curl(cluster, "-H", f"Authorization: Bearer x{token}",
                                     https_url(cluster, ""), auth=False))  # fmt: skip
    assert status == 401
    status, _ = status_and_body(curl(cluster, https_url(cluster, "nothing-here.csv")))
    assert status == 404


@pytest.mark.parametrize("mode", ["passive"])
def test_in_passive_mode_only_the_primary_takes_sessions(make_cluster: Any, mode: str) -> None:
    cluster = make_cluster(mode, servers=2)

    def backends() -> list[dict[str, Any]]:
        answer: list[dict[str, Any]] = cluster.edge_backends().json()
        return answer

    # The edge's admin API asks for the edge secret: nothing without it, or with another.
    for wrong in ("", "not-the-secret"):
        refused = cluster.edge_backends(secret=wrong)
        assert refused.status_code == 401, refused.text
        assert refused.json()["error"]["message"] == (
            "the edge secret is required as a bearer token"
        )  # fmt: skip
        assert refused.headers["www-authenticate"] == "Bearer"

    wait_until(lambda: any(b["node"] == "st1" and b["idle"] for b in backends()), 30,
               "the primary's TM to connect")  # fmt: skip
    assert not [b for b in backends() if b["node"] == "st2" and b["idle"]]
    result = sftp(cluster, "ls\n")
    assert result.returncode == 0, result.stderr


def test_a_banned_address_is_refused_through_the_edge_with_a_reason(
    make_cluster: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # A small threshold and short delays (the services inherit the environment).
    monkeypatch.setenv("FERRYLINK_LOGIN_ADDRESS_THRESHOLD", "3")
    monkeypatch.setenv("FERRYLINK_LOGIN_FAILURE_DELAY", "0.05")
    monkeypatch.setenv("FERRYLINK_LOGIN_MAX_DELAY", "0.2")
    cluster = make_cluster("active_active", servers=1)
    password = Path(demo(cluster)["password_file"]).read_text().strip()
    for attempt in range(3):
        result = sftp_with_password(cluster, f"wrong-{attempt}", "ls\n")
        assert result.returncode != 0 and "Permission denied" in result.stderr, result.stderr

    # Banned: even the right password (and the account's key) is refused, with the reason.
    result = sftp_with_password(cluster, password, "ls\n")
    assert result.returncode != 0
    assert "too many failed logins; try again in" in result.stderr, result.stderr
    result = sftp(cluster, "ls\n")
    assert result.returncode != 0 and "too many failed logins" in result.stderr, result.stderr
    source = _file(tmp_path / "refused.csv", 1000)
    result = curl(cluster, "-D", "-", "-T", str(source), https_url(cluster, "refused.csv"))
    status, body = status_and_body(result)
    assert status == 429 and "too many failed logins; try again in" in body, body
    assert "retry-after:" in body.lower(), body
    assert not (demo_home(cluster) / "refused.csv").exists()
    tm_log = (cluster.state_dir / "logs" / "st1-transaction-manager.log").read_text()
    assert "banned address 127.0.0.1" in tm_log
    assert password not in tm_log and "wrong-0" not in tm_log
