"""`/metrics` after a known workload on a real 1-server cluster: N uploads routed and pushed
to a real HTTP partner, M uploads failing their checksum step, K wrong passwords. The
counts read from the transaction manager's `/metrics` are exactly the workload's."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ferrylink.cluster import WORK_EVENTS, WORK_SCHEDULER
from tests.cluster_support import Cluster
from tests.helpers import wait_until
from tests.http_sink import HttpSink

pytestmark = [pytest.mark.timeout(300)]

PASSWORD = "correct horse"
N, M, K = 5, 3, 2


def metrics(cluster: Cluster, service: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a service's /metrics, by (name, labels)."""
    url = f"http://127.0.0.1:{cluster.port('st1', service)}/metrics"
    text = httpx.get(url, timeout=5).text  # public, like /healthz
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:  # fmt: skip
    return found.get((name, frozenset(labels.items())), 0.0)


def curl_upload(
    base: str, password: str, local: Path, remote: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-sS", "-f", "-u", f"acme:{password}", "-T", str(local),
         f"{base}/files/acme/{remote}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_metrics_count_a_known_workload(
    make_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FERRYLINK_PARTNER_ALLOW", "127.0.0.1")
    with HttpSink(tmp_path / "sink") as sink:
        cluster: Cluster = make_cluster("active_active", servers=1, edges=0)
        wait_until(lambda: WORK_EVENTS in cluster.active("st1", "transaction-manager"), 60,
                   "TM consuming")  # fmt: skip
        base = f"http://127.0.0.1:{cluster.port('st1', 'transaction-manager')}"
        assert (
            cluster.http.post(
                f"{base}/accounts", json={"name": "acme", "password": PASSWORD}
            ).status_code
            == 201
        )
        assert (
            cluster.http.post(
                f"{base}/partners", json={"name": "sink", "protocol": "http", "url": sink.url}
            ).status_code
            == 201
        )
        for route in (
            {"account": "acme", "pattern": "*.csv", "position": 1,
             "steps": [{"kind": "copy", "folder": "copies"}, {"kind": "push", "partner": "sink"}]},
            {"account": "acme", "pattern": "*.bad", "position": 2,
             "steps": [{"kind": "checksum", "algorithm": "md5", "expected": "0" * 32}]},
        ):  # fmt: skip
            assert cluster.http.post(f"{base}/routes", json=route).status_code == 201
        before = metrics(cluster, "transaction-manager")

        sizes = []
        for i in range(N):
            payload = tmp_path / f"good-{i}.csv"
            payload.write_bytes(b"x" * (1000 + 17 * i))
            sizes.append(payload.stat().st_size)
            assert curl_upload(base, PASSWORD, payload, payload.name).returncode == 0
        for i in range(M):
            payload = tmp_path / f"bad-{i}.bad"
            payload.write_bytes(b"tampered")
            sizes.append(payload.stat().st_size)
            assert curl_upload(base, PASSWORD, payload, payload.name).returncode == 0
        for _ in range(K):
            assert curl_upload(base, "wrong password", payload, "x.bad").returncode != 0

        def all_done() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
            found = metrics(cluster, "transaction-manager")
            handled = value(found, "ferrylink_event_latency_seconds_count", kind="file.arrived")
            return found if handled >= N + M else None

        after = wait_until(all_done, 60, "every upload processed")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("ferrylink_files_received_total", protocol="http") == N + M
    assert delta("ferrylink_received_bytes_total", protocol="http") == sum(sizes)
    assert delta("ferrylink_files_sent_total", protocol="http") == N
    assert delta("ferrylink_sent_bytes_total", protocol="http") == sum(sizes[:N])
    assert delta("ferrylink_transfer_failures_total", reason="checksum") == M
    assert delta("ferrylink_route_step_duration_seconds_count", step="copy", outcome="done") == N
    assert delta("ferrylink_route_step_duration_seconds_count", step="push", outcome="done") == N
    assert (
        delta("ferrylink_route_step_duration_seconds_count", step="checksum", outcome="failed") == M
    )
    assert delta("ferrylink_partner_push_duration_seconds_count", protocol="http",
                 outcome="sent") == N  # fmt: skip
    assert delta("ferrylink_event_latency_seconds_count", kind="file.arrived") == N + M
    assert delta("ferrylink_messages_handled_total", consumer="events", outcome="done") == N + M
    assert delta("ferrylink_login_failures_total") == K
    assert value(after, "ferrylink_consumer_active", consumer=WORK_EVENTS) == 1
    assert value(after, "ferrylink_broker_connected") == 1
    assert value(after, "ferrylink_config_version") >= 1

    # The primary's flag and epoch, set by every process (here the scheduler's).
    wait_until(lambda: WORK_SCHEDULER in cluster.active("st1", "scheduler"), 30, "scheduler")
    scheduler = metrics(cluster, "scheduler")
    assert value(scheduler, "ferrylink_primary") == 1
    assert value(scheduler, "ferrylink_cluster_epoch") >= 1

    # The coordinator leader samples the queue depths (nothing waits once all is done).
    def sampled() -> dict[tuple[str, frozenset[tuple[str, str]]], float] | None:
        found = metrics(cluster, "cluster-coordinator")
        key = ("ferrylink_queue_messages", frozenset({("queue", "events")}))
        return found if key in found else None

    coordinator = wait_until(sampled, 30, "queue depths sampled")
    assert value(coordinator, "ferrylink_queue_messages", queue="events") == 0
    assert value(coordinator, "ferrylink_primary_changes_total") >= 1
