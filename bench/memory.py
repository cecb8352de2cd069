"""Idle memory: the resident set size of one server's processes together, once the cluster
is up and has settled (target: under 400 MB)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.common import broker_url, local_cluster, report
from ferrylink.cluster import WORK_SCHEDULER
from ferrylink_ops.polling import wait_until

TARGET_MB = 400.0


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def run(settle: float) -> dict[str, Any]:
    with broker_url() as url, local_cluster(1, "active_active", url) as cluster:
        wait_until(
            lambda: WORK_SCHEDULER in cluster.active("st1", "scheduler"),
            60,
            "the server to be primary",
        )
        # Idle means running its loops and heartbeats for a while, not just started.
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            time.sleep(0.5)
        services = cluster.doc()["servers"][0]["services"]
        per_service = {name: rss_mb(svc["pid"]) for name, svc in services.items()}
    total = sum(per_service.values())
    return {"per_service_mb": per_service, "total_mb": total, "target_mb": TARGET_MB,
            "ratio_to_target": total / TARGET_MB}  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds of idling")
    data = run(parser.parse_args(argv).settle)
    rows = [[name, f"{mb:.1f}"] for name, mb in data["per_service_mb"].items()]
    rows.append(["one server, total", f"{data['total_mb']:.1f} (target < {TARGET_MB:.0f})"])
    report("memory", rows, ["process", "RSS MB"], data)
    return data


if __name__ == "__main__":
    main()
