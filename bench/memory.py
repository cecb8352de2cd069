"""Idle memory of one server: each process's RSS and PSS once the cluster is up and has
settled, with the per-process average and the server's total.

PSS (proportional set size) splits pages shared between processes (the Python interpreter,
shared libraries) among them, so the PSS of a server's processes adds up to what the
server really costs; RSS counts shared pages in every process. Targets: an average of at
most 72 MB RSS per process of the server (its five; the edge serves the whole cluster from
the DMZ, so its smaller figure is shown beside the average, not in it); one server with its
edge under 400 MB PSS, the goal being 300 MB.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from bench.common import broker_url, local_cluster, report
from ferrylink.contracts import WORK_SCHEDULER
from ferrylink_ops.polling import wait_until

AVERAGE_RSS_TARGET_MB = 72.0
SERVER_PSS_TARGET_MB = 400.0
SERVER_PSS_GOAL_MB = 300.0


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of a process in MB, from /proc/PID/smaps_rollup."""
    values: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key] = int(rest.split()[0]) / 1024
    return values["Rss"], values["Pss"]


def run(settle: float) -> dict[str, Any]:
    with broker_url() as url, local_cluster(1, "active_active", url) as cluster:
        wait_until(
            lambda: WORK_SCHEDULER in cluster.active("st1", "scheduler"),
            60,
            "the server to be primary",
        )
        # Idle means having run its loops and heartbeats for a while, not just started.
        time.sleep(settle)
        doc = cluster.doc()
        backend = {name: svc["pid"] for name, svc in doc["servers"][0]["services"].items()}
        edges = {edge["id"]: edge["pid"] for edge in doc.get("edges", [])}
        per_process = {name: memory_mb(pid) for name, pid in {**backend, **edges}.items()}
    rss = [r for r, _ in per_process.values()]
    backend_rss = [per_process[name][0] for name in backend]
    pss_total = sum(p for _, p in per_process.values())
    # The target is the server's own processes' (an edge serves the whole cluster).
    average_backend_rss = sum(backend_rss) / len(backend_rss)
    return {
        "per_process": {n: {"rss_mb": r, "pss_mb": p} for n, (r, p) in per_process.items()},
        "average_backend_rss_mb": average_backend_rss,
        "average_rss_with_edge_mb": sum(rss) / len(rss),
        "average_rss_target_mb": AVERAGE_RSS_TARGET_MB,
        "average_rss_target_met": average_backend_rss <= AVERAGE_RSS_TARGET_MB,
        "server_rss_mb": sum(rss),
        "server_pss_mb": pss_total,
        "server_pss_target_mb": SERVER_PSS_TARGET_MB,
        "server_pss_goal_mb": SERVER_PSS_GOAL_MB,
        "ratio_pss_to_target": pss_total / SERVER_PSS_TARGET_MB,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds of idling")
    data = run(parser.parse_args(argv).settle)
    rows = [
        [name, f"{m['rss_mb']:.1f}", f"{m['pss_mb']:.1f}"]
        for name, m in data["per_process"].items()
    ]
    met = "met" if data["average_rss_target_met"] else "not met"
    rows.append(
        [
            "average per server process",
            f"{data['average_backend_rss_mb']:.1f} (target <= 72: {met})",
            "",
        ]
    )
    rows.append(["average with the edge", f"{data['average_rss_with_edge_mb']:.1f}", ""])
    rows.append(
        [
            "one server, total",
            f"{data['server_rss_mb']:.1f}",
            f"{data['server_pss_mb']:.1f} (target < 400, goal 300)",
        ]
    )
    report("memory", rows, ["process", "RSS MB", "PSS MB"], data)
    return data


if __name__ == "__main__":
    main()
