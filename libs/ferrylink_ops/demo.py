"""The demo account: a new user can send a file the moment `ferrylink up` is ready."""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Any

import httpx

from ferrylink_ops.admin_setup import auth_headers
from ferrylink_ops.local_cluster import HTTP_HOST, ClusterError, LocalCluster

DEMO_ACCOUNT = "demo"


def create_demo(cluster: LocalCluster) -> dict[str, Any]:
    """Account `demo` (password and key pair in STATE_DIR/demo/), a route copying its uploads
    to `archive`, and a known_hosts file with the edges' host key. Kept across restarts of
    the same state directory."""
    import asyncssh

    demo_dir = cluster.state_dir / DEMO_ACCOUNT
    demo_dir.mkdir(exist_ok=True)
    password_file, key_file = demo_dir / "password", demo_dir / "id_ed25519"
    if not password_file.exists():
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as stream:
            stream.write(secrets.token_urlsafe(18) + "\n")
    if not key_file.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment="demo@ferrylink")
        key.write_private_key(str(key_file))
        os.chmod(key_file, 0o600)
        key.write_public_key(str(key_file) + ".pub")
    public_key = Path(str(key_file) + ".pub").read_text().strip()
    tm = next(
        s.services["transaction-manager"] for s in cluster.servers
        if s.services["transaction-manager"].running
    )  # fmt: skip
    headers = auth_headers(cluster.state_dir)
    with httpx.Client(base_url=tm.url, timeout=30, headers=headers) as client:
        created = client.post("/accounts", json={
            "name": DEMO_ACCOUNT, "password": password_file.read_text().strip(),
            "ssh_public_keys": [public_key],
        })  # fmt: skip
        if created.status_code not in (201, 409):
            raise ClusterError(f"creating the demo account: {created.text}")
        if not client.get("/routes", params={"account": DEMO_ACCOUNT}).json()["items"]:
            route = client.post("/routes", json={
                "account": DEMO_ACCOUNT, "pattern": "*",
                "steps": [{"kind": "copy", "folder": "archive"}],
            })  # fmt: skip
            if route.status_code != 201:
                raise ClusterError(f"creating the demo route: {route.text}")
    host_key = cluster.edge_keys_dir / "ssh_host_ed25519_key"
    known_hosts = demo_dir / "known_hosts"
    host_public = asyncssh.read_private_key(str(host_key)).export_public_key().decode().strip()
    known_hosts.write_text(
        "".join(f"[{HTTP_HOST}]:{edge.sftp_port} {host_public}\n" for edge in cluster.edges)
    )
    edge = cluster.edges[0]
    return {
        "account": DEMO_ACCOUNT,
        "password_file": str(password_file),
        "key_file": str(key_file),
        "known_hosts": str(known_hosts),
        "ca_file": str(cluster.edge_keys_dir / "tls.crt"),
        "sftp_port": edge.sftp_port,
        "https_port": edge.https_port,
        "transfers_url": f"{tm.url}/transfers?account={DEMO_ACCOUNT}",
        "token_file": str(cluster.state_dir / "admin" / "token"),
        "archive": str(cluster.data_dir / "archive"),
    }


def demo_lines(demo: dict[str, Any]) -> list[str]:
    """Three ready-to-paste lines: SFTP in, an HTTPS upload, where the transfer shows."""
    if not demo:
        return []
    return [
        "send a file as the demo account:",
        f"  sftp -i {demo['key_file']} -o UserKnownHostsFile={demo['known_hosts']} "
        f"-P {demo['sftp_port']} {demo['account']}@{HTTP_HOST}",
        f"  curl --cacert {demo['ca_file']} -u {demo['account']}:$(cat {demo['password_file']}) "
        f"-T FILE https://{HTTP_HOST}:{demo['https_port']}/files/",
        f'  see it: curl -s -H "Authorization: Bearer $(cat {demo["token_file"]})" '
        f"'{demo['transfers_url']}'   and   ls {demo['archive']}",
    ]
