"""The shared edge limits (sessions per account, idle timeout, max file size, per-account
quota): set through the transaction manager's API while the cluster runs, applied by the
edge to the next session without a restart, each refusal seen by OpenSSH's `sftp` or
`curl` with a message saying which limit."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from ferrylink_ops.polling import wait_until
from tests.cluster_support import Cluster
from tests.edge_support import curl, demo, demo_home, https_url, sftp, status_and_body


def _limits(cluster: Cluster, **limits: int) -> None:
    url = f"http://127.0.0.1:{cluster.port('st1', 'transaction-manager')}/edge-limits"
    body = {"sessions_per_account": 0, "idle_timeout_s": 0, "max_file_bytes": 0,
            "quota_bytes": 0, **limits}  # fmt: skip
    answer = cluster.http.put(url, json=body)
    assert answer.status_code == 200, answer.text
    assert cluster.http.get(url).json() == body


def _file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def _open_session(cluster: Cluster) -> subprocess.Popen[str]:
    """An interactive `sftp` session, logged in (it has answered a `pwd`)."""
    info = demo(cluster)
    client = subprocess.Popen(
        ["sftp", "-i", info["key_file"], "-o", f"UserKnownHostsFile={info['known_hosts']}",
         "-o", "IdentitiesOnly=yes", "-P", str(cluster.doc()["edges"][0]["sftp_port"]),
         "-b", "-", "demo@127.0.0.1"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert _pwd(client), "the sftp session did not start"
    return client


def _ssh_children(pid: int) -> list[str]:
    """The live (not zombie) child processes of `sftp` (its `ssh`), from /proc."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    pids = children.read_text().split() if children.exists() else []
    return [c for c in pids if _process_state(c) not in ("Z", "X", "")]


def _process_state(pid: str) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def _pwd(client: subprocess.Popen[str]) -> bool:
    """Send `pwd`; True once the answer came (False if the session ended first)."""
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write("pwd\n")
    client.stdin.flush()
    while line := client.stdout.readline():
        if "Remote working directory" in line:
            return True
    return False


def _end(client: subprocess.Popen[str]) -> tuple[str, str]:
    """End the session (EOF on its commands) and return what it printed."""
    out, err = client.communicate(timeout=30)
    return out, err


def test_edge_limits_apply_without_restart(make_cluster: Any, tmp_path: Path) -> None:
    cluster = make_cluster("active_active", servers=1)
    edge_pid = cluster.doc()["edges"][0]["pid"]
    home = demo_home(cluster)
    small, big = _file(tmp_path / "small.bin", 100_000), _file(tmp_path / "big.bin", 300_000)

    # -- max file size --------------------------------------------------------------------
    _limits(cluster, max_file_bytes=200_000)
    result = sftp(cluster, f"put {big}\n")
    assert result.returncode != 0
    assert "larger than the maximum of 200000 bytes" in result.stderr, result.stderr
    status, body = status_and_body(curl(cluster, "-T", str(big), https_url(cluster, "web/")))
    assert status == 413, body
    assert "larger than the maximum of 200000 bytes" in json.loads(body)["error"]["message"]
    result = sftp(cluster, f"put {small}\n")  # below the limit: fine
    assert result.returncode == 0, result.stderr
    # Nothing of a refused upload is kept: not under its name, not as a resumable partial.
    assert sorted(p.name for p in home.rglob("*") if p.is_file()) == ["small.bin"]

    # -- per-account quota (what is in the home counts) ---------------------------------------
    _limits(cluster, quota_bytes=350_000)
    result = sftp(cluster, f"put {big}\n")  # 100 000 + 300 000 > 350 000
    assert result.returncode != 0
    assert "quota of 350000 bytes would be exceeded" in result.stderr, result.stderr
    status, body = status_and_body(curl(cluster, "-T", str(big), https_url(cluster, "web/")))
    assert status == 507, body
    assert "quota of 350000 bytes would be exceeded" in json.loads(body)["error"]["message"]
    assert not (home / "big.bin").exists() and not (home / "web" / "big.bin").exists()
    result = sftp(cluster, f"rm small.bin\nput {big}\n")  # room made: it fits
    assert result.returncode == 0, result.stderr
    assert (home / "big.bin").stat().st_size == 300_000

    # -- sessions per account ------------------------------------------------------------------
    _limits(cluster, sessions_per_account=1)
    first = _open_session(cluster)
    try:
        result = sftp(cluster, "ls\n")
        assert result.returncode != 0
        assert "already has 1 session(s) on this edge" in result.stderr, result.stderr
        status, body = status_and_body(curl(cluster, https_url(cluster, "")))
        assert status == 429 and "already has 1 session(s)" in body, body
    finally:
        _end(first)
    result = sftp(cluster, "ls\n")  # the first session ended: room for another
    assert result.returncode == 0, result.stderr

    # -- idle timeout ----------------------------------------------------------------------------
    _limits(cluster, idle_timeout_s=2)
    idle = _open_session(cluster)
    edge_log = cluster.state_dir / "logs" / "edge1.log"
    try:
        # `sftp` waiting for its next command notices the disconnect only then; the edge's
        # log says when it happened.
        wait_until(lambda: "idle for 2 s: disconnecting" in edge_log.read_text(), 30,
                   "the idle session to be disconnected")  # fmt: skip
        # The edge logs before it disconnects: the client's ssh child, which prints the
        # reason, exits once it has read the disconnect.
        wait_until(lambda: not _ssh_children(idle.pid), 30, "the client's ssh to end")
    finally:
        _out, err = _end(idle)
    assert "session closed (idle timeout)" in err, err
    busy = _open_session(cluster)  # a session that keeps sending requests stays up
    try:
        for _ in range(4):
            time.sleep(1.0)  # the client's pace: a request every second, 4 s in all
            assert _pwd(busy), "a busy session was disconnected"
    finally:
        _end(busy)

    # -- limits cleared: everything goes again, and the edge never restarted --------------------
    _limits(cluster)
    status, body = status_and_body(curl(cluster, "-T", str(big), https_url(cluster, "web/")))
    assert status == 201, body
    assert cluster.doc()["edges"][0]["pid"] == edge_pid
