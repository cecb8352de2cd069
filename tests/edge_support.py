"""Driving a local cluster's edge the way a partner does: OpenSSH's `sftp` in batch mode
and `curl`, with the demo account `ferrylink up` creates."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from tests.cluster_support import Cluster


def demo(cluster: Cluster) -> dict[str, Any]:
    found: dict[str, Any] = cluster.doc()["demo"]
    return found


def demo_home(cluster: Cluster) -> Path:
    return cluster.state_dir / "data" / "homes" / "demo"


def sftp(
    cluster: Cluster, commands: str, *options: str, edge: int = 0, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`sftp -b -` with the demo key; `commands` one a line."""
    info = demo(cluster)
    port = cluster.doc()["edges"][edge]["sftp_port"]
    return subprocess.run(
        ["sftp", *options, "-i", info["key_file"],
         "-o", f"UserKnownHostsFile={info['known_hosts']}", "-o", "IdentitiesOnly=yes",
         "-P", str(port), "-b", "-", "demo@127.0.0.1"],
        input=commands, capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip


def sftp_with_password(
    cluster: Cluster, password: str, commands: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Password login in batch mode: BatchMode=no first (the first value wins over the one
    `-b` adds) and the password from an askpass script."""
    info = demo(cluster)
    port = cluster.doc()["edges"][0]["sftp_port"]
    askpass = cluster.state_dir / "askpass.sh"
    askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$FL_TEST_PASSWORD"\n')
    askpass.chmod(0o700)
    env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force",
               FL_TEST_PASSWORD=password)  # fmt: skip
    return subprocess.run(
        ["sftp", "-o", "BatchMode=no", "-o", f"UserKnownHostsFile={info['known_hosts']}",
         "-o", "PubkeyAuthentication=no", "-o", "PreferredAuthentications=password",
         "-o", "NumberOfPasswordPrompts=1", "-P", str(port), "-b", "-", "demo@127.0.0.1"],
        input=commands, capture_output=True, text=True, timeout=timeout, check=False, env=env,
    )  # fmt: skip


def curl(cluster: Cluster, *args: str, auth: bool = True) -> subprocess.CompletedProcess[str]:
    """curl against the edge's HTTPS port (its certificate checked); `-w` prints the status
    on the last line."""
    info = demo(cluster)
    credentials = ["-u", f"demo:{Path(info['password_file']).read_text().strip()}"] if auth else []
    return subprocess.run(
        ["curl", "-sS", "--cacert", info["ca_file"], *credentials, "-w", "\n%{http_code}", *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def https_url(cluster: Cluster, path: str) -> str:
    return f"https://127.0.0.1:{cluster.doc()['edges'][0]['https_port']}/files/{path}"


def status_and_body(result: subprocess.CompletedProcess[str]) -> tuple[int, str]:
    body, _, status = result.stdout.rpartition("\n")
    return int(status or 0), body
