"""What the benchmarks share: a local cluster to measure, result tables and JSON files."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ferrylink_ops.admin_setup import auth_headers
from ferrylink_ops.local_cluster import broker_reachable, pick_free_base_port
from ferrylink_ops.private_broker import BrokerNode, start_private_broker

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def ferrylink(*args: str, timeout: float = 300) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ferrylink_ops.cli", *args],
        capture_output=True, text=True, timeout=timeout, check=False,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"ferrylink {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
    return result.stdout


@contextmanager
def broker_url() -> Iterator[str]:
    """FERRYLINK_AMQP_URL when set (and answering), else a private node for the run: the
    machine's shared broker carries others' load (and has stalled under it)."""
    url = os.environ.get("FERRYLINK_AMQP_URL", "")
    if url and broker_reachable(url):
        yield url
        return
    node: BrokerNode = start_private_broker(Path(tempfile.mkdtemp(prefix="ferrylink-bench-")))
    try:
        yield node.url
    finally:
        node.stop()


def free_base_port(servers: int) -> int:
    """A base port whose servers' and one edge's ports are all free now."""
    return pick_free_base_port(servers, edges=1)


@dataclass
class BenchCluster:
    state_dir: Path
    prefix: str
    amqp_url: str

    @property
    def headers(self) -> dict[str, str]:
        """The admin token `ferrylink up` wrote to STATE_DIR/admin/."""
        return auth_headers(self.state_dir)

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads((self.state_dir / "cluster.json").read_text())
        return doc

    def port(self, server: str, service: str) -> int:
        entry = next(s for s in self.doc()["servers"] if s["id"] == server)
        port: int = entry["services"][service]["port"]
        return port

    def view(self, exclude: tuple[str, ...] = ()) -> dict[str, Any] | None:
        for entry in self.doc()["servers"]:
            if entry["id"] in exclude:
                continue
            try:
                url = f"http://127.0.0.1:{self.port(entry['id'], 'cluster-coordinator')}/cluster"
                view: dict[str, Any] = httpx.get(url, timeout=2, headers=self.headers).json()
                return view
            except httpx.HTTPError:
                continue
        return None

    def active(self, server: str, service: str) -> set[str]:
        try:
            url = f"http://127.0.0.1:{self.port(server, service)}/work"
            return set(httpx.get(url, timeout=2, headers=self.headers).json()["active"])
        except httpx.HTTPError:
            return set()


@contextmanager
def local_cluster(
    servers: int, mode: str, amqp_url: str, env: dict[str, str] | None = None
) -> Iterator[BenchCluster]:
    """`ferrylink up --detach` in a temporary state directory; `down` afterwards."""
    state_dir = Path(tempfile.mkdtemp(prefix="ferrylink-bench-")) / "state"
    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    saved = dict(os.environ)
    os.environ.update({"FERRYLINK_AMQP_URL": amqp_url, **(env or {})})
    try:
        ferrylink(
            "up", "--servers", str(servers), "--mode", mode, "--state-dir", str(state_dir),
            "--base-port", str(free_base_port(servers)), "--prefix", prefix, "--detach",
        )  # fmt: skip
        yield BenchCluster(state_dir, prefix, amqp_url)
    finally:
        os.environ.clear()
        os.environ.update(saved)
        subprocess.run(
            [sys.executable, "-m", "ferrylink_ops.cli", "down", "--state-dir", str(state_dir)],
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def report(name: str, rows: list[list[Any]], headers: list[str], data: dict[str, Any]) -> None:
    """Print a table and write bench/results/<name>.json."""
    widths = [max(len(str(x)) for x in [h, *(r[i] for r in rows)]) for i, h in enumerate(headers)]
    print()
    print("  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=True)))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    print(f"\nwritten to {path}")
