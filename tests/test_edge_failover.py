"""SIGKILL the server the edge is using during an SFTP upload loop (real OpenSSH client,
one session per file, 2 servers): every file the client was told succeeded arrives exactly
once; a file it was told failed is absent or complete, never partial."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from tests.edge_support import demo_home, sftp
from tests.helpers import wait_until

FILES = 24
# With -l 16000 (~2 MB/s) an upload takes most of a second.
SIZE = 1_500_000
# The test kills once the upload of file KILLED_DURING has started. That file and the next
# go at -l 2000 (~6 s each): the kill (a CLI process, then the supervisor) lands inside an
# upload however long it takes, and however fast the machine moves from one file to the
# next (at 2 MB/s the whole upload had once ended before the kill came).
KILLED_DURING = 5
SLOW = {KILLED_DURING, KILLED_DURING + 1}


@pytest.mark.fault
def test_killing_the_backend_during_an_upload_loop(make_cluster: Any, tmp_path: Path) -> None:
    cluster = make_cluster("active_active", servers=2)

    def backends() -> dict[str, dict[str, Any]]:
        return {b["node"]: b for b in cluster.edge_backends().json()}

    wait_until(lambda: all(backends().get(n, {}).get("idle") for n in ("st1", "st2")), 60,
               "both transaction managers to connect to the edge")  # fmt: skip

    sources = []
    for i in range(FILES):
        path = tmp_path / f"file-{i:03}.bin"
        path.write_bytes(os.urandom(SIZE))
        sources.append(path)
    told: dict[str, bool] = {}
    errors: dict[str, str] = {}

    def upload_loop() -> None:
        for i, path in enumerate(sources):
            rate = "2000" if i in SLOW else "16000"
            result = sftp(cluster, f"put {path}\n", "-l", rate)
            told[path.name] = result.returncode == 0
            errors[path.name] = result.stderr

    loop = threading.Thread(target=upload_loop)
    loop.start()
    try:
        # Kill the server that serves the session running now, a few files in.
        wait_until(lambda: len(told) >= KILLED_DURING, 120, "the first uploads")
        victim = wait_until(
            lambda: next((n for n, b in backends().items() if b["sessions"]), None), 30,
            "a session on a backend",
        )  # fmt: skip
        cluster.run("server", "kill", victim)
    finally:
        loop.join(600)
    assert len(told) == FILES
    failed = [name for name, ok in told.items() if not ok]
    succeeded = [name for name, ok in told.items() if ok]
    assert failed, "the kill should have cut at least one upload"
    assert len(failed) <= 5, f"new sessions should go to the live server: {failed}"
    # The cut session was told why, not just "Connection closed".
    assert any(f"the server {victim} handling this session went away" in errors[name]
               for name in failed), {name: errors[name] for name in failed}  # fmt: skip
    after_kill = [p.name for p in sources[-8:]]
    assert all(told[name] for name in after_kill), told

    home = demo_home(cluster)
    archive = cluster.state_dir / "data" / "archive"
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sources}

    def sha(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    for name in succeeded:
        assert sha(home / name) == digests[name], f"{name} was told succeeded"
    for name in failed:
        target = home / name
        assert not target.exists() or sha(target) == digests[name], f"{name} is partial"
    # The route copies every arrived file to the archive, once (the copies of events the
    # dead server held are redelivered to the live one).
    arrived = [p.name for p in home.iterdir() if not p.name.startswith(".")]
    wait_until(lambda: all((archive / n).exists() for n in arrived), 90, "every archive copy")
    for name in arrived:
        assert sha(archive / name) == digests[name]
    database = sqlite3.connect(cluster.state_dir / "ferrylink.db")
    try:
        received = dict(
            database.execute(
                "SELECT file_name, count(*) FROM transfer WHERE account = 'demo' "
                "AND leg = 'receive' AND status = 'RECEIVED' GROUP BY file_name"
            ).fetchall()
        )
    finally:
        database.close()
    for name in succeeded:
        assert received.get(name) == 1, f"{name}: {received.get(name)} receipts"
