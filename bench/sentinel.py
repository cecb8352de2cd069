"""Event processing with tracking on: file.arrived events per second through the transaction
manager of a cluster whose sentinel link delivers every transfer state to two tracking
endpoints, one of them down for the whole run (its backlog grows), next to a cluster without
tracking (its sentinel link killed, nothing consumes the transfer states), in the same run.

Both clusters (1 server, active_active, a route with one move step) run side by side and the
measured rounds alternate between them, so load from elsewhere on the machine hits both
alike. After a tracking round the bench waits (outside the measurement) until the sentinel
link has caught up (transfer-states queue empty, the up endpoint's backlog empty), so every
round starts from the same state.

The bench starts `--pairs` such pairs of fresh clusters one after the other and pools their
rounds: a process has a speed of its own for its life, so one pair measures its two
transaction managers as much as tracking.

Target (README): with tracking within 10 % of without (ratio at least 0.9). Two ratios are
reported: of the medians of all rounds, and the median of each tracking round's ratio to the
baseline round next to it. The machine's speed drifts from one round to the next (here by
up to 15 % between neighbours, in both clusters alike), which the second cancels.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
from contextlib import ExitStack
from typing import Any

import httpx
import pika

from bench.common import BenchCluster, broker_url, local_cluster, report
from bench.events import events_per_second, set_up_route
from ferrylink.cluster import WORK_EVENTS, WORK_SENTINEL_LINK
from ferrylink.messaging import Topology
from ferrylink_ops.polling import wait_until
from ferrylink_ops.tracking_sink import TrackingSink

# The baseline server counts as up without its sentinel link.
WITHOUT_SENTINEL = "transaction-manager,scheduler,folder-monitor,cluster-coordinator"


def transfer_states_waiting(cluster: BenchCluster) -> int:
    queue = Topology(prefix=cluster.prefix).queue("transfer-states")
    connection = pika.BlockingConnection(pika.URLParameters(cluster.amqp_url))
    try:
        count: int = connection.channel().queue_declare(queue, passive=True).method.message_count
        return count
    finally:
        connection.close()


def endpoints(cluster: BenchCluster) -> dict[str, dict[str, Any]]:
    url = f"http://127.0.0.1:{cluster.port('st1', 'sentinel-link')}/endpoints"
    listed = httpx.get(url, headers=cluster.headers, timeout=10).json()["items"]
    return {e["name"]: e for e in listed}


def caught_up(cluster: BenchCluster) -> bool:
    try:
        return transfer_states_waiting(cluster) == 0 and endpoints(cluster)["up"]["backlog"] == 0
    except (pika.exceptions.AMQPError, httpx.HTTPError):
        return False  # a busy shared broker or service: ask again


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (/proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def service_pid(cluster: BenchCluster, service: str) -> int:
    pid: int = cluster.doc()["servers"][0]["services"][service]["pid"]
    return pid


def wait_consuming(cluster: BenchCluster, unit: str, service: str) -> None:
    wait_until(lambda: unit in cluster.active("st1", service), 120, f"{service} running {unit}")


def one_pair(url: str, count: int, rounds: int) -> dict[str, Any]:
    """Two fresh clusters, with and without tracking, measured in alternating rounds."""
    up, down = TrackingSink(), TrackingSink()
    down.stop()  # down for the whole run: connections refused
    try:
        with ExitStack() as stack:
            tracking = stack.enter_context(
                local_cluster(1, "active_active", url, {"FERRYLINK_SENTINEL_BACKOFF_MAX": "2"})
            )
            baseline = stack.enter_context(
                local_cluster(
                    1, "active_active", url, {"FERRYLINK_REQUIRED_SERVICES": WITHOUT_SENTINEL}
                )  # fmt: skip
            )
            os.kill(baseline.doc()["servers"][0]["services"]["sentinel-link"]["pid"],
                    signal.SIGKILL)  # fmt: skip
            wait_consuming(tracking, WORK_SENTINEL_LINK, "sentinel-link")
            for cluster in (tracking, baseline):
                wait_consuming(cluster, WORK_EVENTS, "transaction-manager")
                set_up_route(cluster)
            sentinel = f"http://127.0.0.1:{tracking.port('st1', 'sentinel-link')}/endpoints"
            for name, sink in (("up", up), ("down", down)):
                httpx.post(sentinel, json={"name": name, "url": sink.url},
                           headers=tracking.headers, timeout=10).raise_for_status()  # fmt: skip

            link_pid = service_pid(tracking, "sentinel-link")
            link_cpu: list[float] = []  # the sentinel link's CPU per event, ms
            # The transaction manager's CPU per event in each cluster, ms: tells a slower
            # transaction manager (the shared database) from one that waited for a core.
            tm_cpu: dict[str, list[float]] = {"with_tracking": [], "without_tracking": []}

            def measure(cluster: BenchCluster, tag: str) -> float:
                tm_pid = service_pid(cluster, "transaction-manager")
                before, tm_before = cpu_seconds(link_pid), cpu_seconds(tm_pid)
                rate = events_per_second(cluster, url, count, tag)
                tm_spent = (cpu_seconds(tm_pid) - tm_before) * 1000 / count
                tm_cpu["with_tracking" if cluster is tracking else "without_tracking"].append(
                    tm_spent
                )
                if cluster is tracking:
                    wait_until(lambda: caught_up(tracking), 600, "the sentinel link caught up", 1.0)
                    link_cpu.append((cpu_seconds(link_pid) - before) * 1000 / count)
                return rate

            # Warm-up (imports, caches, first connections), not counted.
            for cluster in (tracking, baseline):
                measure(cluster, "warm")
            with_tracking: list[float] = []
            without: list[float] = []
            for n in range(rounds):
                # Alternate which goes first, so neither always follows the other's tail.
                order = [(tracking, with_tracking), (baseline, without)]
                for cluster, rates in order if n % 2 == 0 else order[::-1]:
                    rates.append(measure(cluster, f"r{n}-"))
                    label = "with" if cluster is tracking else "without"
                    print(f"round {n}: {label} tracking {rates[-1]:.1f} events/s", flush=True)
            status = endpoints(tracking)
    finally:
        up.stop()
        down.stop()
    return {
        "with_tracking": with_tracking,
        "without_tracking": without,
        # Rounds and their catch-up (the bench's idle polls of its API included).
        "sentinel_link_cpu_ms_per_event": statistics.median(link_cpu[1:]),
        "transaction_manager_cpu_ms_per_event": {
            k: statistics.median(v[1:]) for k, v in tm_cpu.items()
        },
        "states_at_up_endpoint": len(up.unique_states()),
        "down_endpoint": {k: status["down"][k] for k in ("backlog", "dropped", "failures")},
    }


def run(count: int, rounds: int, pairs: int) -> dict[str, Any]:
    """`pairs` pairs of fresh clusters one after the other, their rounds pooled. A process
    instance has a speed of its own for its whole life (memory layout, hash seeds): in
    single pairs the transaction manager's CPU per event differed by up to 18 % between the
    two clusters, either way, and whole runs measured from 0.80 to 1.04."""
    with broker_url() as url:
        measured = [one_pair(url, count, rounds) for _ in range(pairs)]
    with_tracking = [rate for m in measured for rate in m["with_tracking"]]
    without = [rate for m in measured for rate in m["without_tracking"]]
    ratio = statistics.median(with_tracking) / statistics.median(without)
    # Round n of each cluster ran next to the other's round n (in alternating order).
    paired = statistics.median(w / b for w, b in zip(with_tracking, without, strict=True))
    return {
        "events_per_round": count,
        "rounds": rounds,
        "pairs": pairs,
        "events_per_s": {"with_tracking": with_tracking, "without_tracking": without},
        "median_events_per_s": {
            "with_tracking": statistics.median(with_tracking),
            "without_tracking": statistics.median(without),
        },
        "ratio": ratio,
        "paired_ratio": paired,
        "ratio_per_pair": [
            statistics.median(m["with_tracking"]) / statistics.median(m["without_tracking"])
            for m in measured
        ],
        "target_ratio": 0.9,
        "pair_details": measured,
        "sentinel_link_cpu_ms_per_event": statistics.median(
            m["sentinel_link_cpu_ms_per_event"] for m in measured
        ),
        "transaction_manager_cpu_ms_per_event": [
            m["transaction_manager_cpu_ms_per_event"] for m in measured
        ],
        "states_at_up_endpoint": [m["states_at_up_endpoint"] for m in measured],
        "down_endpoint": [m["down_endpoint"] for m in measured],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__)
    # Rounds long enough that the sentinel link's work falls inside them: with 500 events a
    # round ended before it did (the bench then waits for it outside the measurement), which
    # measured 0.96 where rounds of 2,000 measured 0.74. With rounds of 2,000 (about a
    # second each) and 5 of them, one run's ratio differed from the next's by up to 0.13.
    parser.add_argument("--events", type=int, default=4000, help="events per round")
    parser.add_argument("--rounds", type=int, default=7, help="rounds per pair of clusters")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of fresh clusters")
    args = parser.parse_args(argv)
    data = run(args.events, args.rounds, args.pairs)
    medians = data["median_events_per_s"]
    rows = [
        ["without tracking (no sentinel link)", f"{medians['without_tracking']:.0f}", "1.00"],
        ["with tracking, one of two endpoints down", f"{medians['with_tracking']:.0f}",
         f"{data['ratio']:.2f}"],
    ]  # fmt: skip
    report("sentinel", rows, ["path (median of rounds)", "events/s", "ratio"], data)
    print(f"median of the paired rounds' ratios: {data['paired_ratio']:.2f}; ratio per pair "
          f"of clusters: {', '.join(f'{r:.2f}' for r in data['ratio_per_pair'])}")  # fmt: skip
    for n, pair in enumerate(data["pair_details"]):
        down, tm = pair["down_endpoint"], pair["transaction_manager_cpu_ms_per_event"]
        print(f"pair {n}: states at the up endpoint {pair['states_at_up_endpoint']}, down "
              f"endpoint backlog {down['backlog']}, dropped {down['dropped']}; sentinel link "
              f"CPU {pair['sentinel_link_cpu_ms_per_event']:.3f} ms an event; transaction "
              f"manager CPU {tm['with_tracking']:.3f} ms an event with tracking, "
              f"{tm['without_tracking']:.3f} without")  # fmt: skip
    return data


if __name__ == "__main__":
    main()
