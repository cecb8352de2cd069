"""One upload through the edge is one trace: spans exported by every process (standard
OTEL_* variables) to an in-process OTLP/HTTP receiver share one trace id from the edge's
HTTPS request through the transaction manager (upload, event, route steps) to the sentinel
link; the failed step is marked as an error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from ferrylink.cluster import WORK_EVENTS, WORK_SENTINEL_LINK
from tests.cluster_support import Cluster
from tests.edge_support import curl, https_url, status_and_body
from tests.helpers import wait_until
from tests.otlp_receiver import STATUS_ERROR, OtlpReceiver, ReceivedSpan

pytestmark = [pytest.mark.timeout(300)]


def test_one_upload_is_one_trace_from_the_edge_to_the_sentinel_link(
    make_cluster: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with OtlpReceiver() as receiver:
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", receiver.url)
        monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")  # export within 0.2 s
        cluster: Cluster = make_cluster("active_active", servers=1, edges=1)
        wait_until(lambda: {WORK_EVENTS} <= cluster.active("st1", "transaction-manager")
                   and WORK_SENTINEL_LINK in cluster.active("st1", "sentinel-link"), 60,
                   "TM and sentinel link working")  # fmt: skip
        tm = f"http://127.0.0.1:{cluster.port('st1', 'transaction-manager')}"
        route = {"account": "demo", "pattern": "*.bad", "position": -1, "steps": [
            {"kind": "copy", "folder": "traced"},
            {"kind": "checksum", "algorithm": "md5", "expected": "0" * 32},
        ]}  # fmt: skip
        assert cluster.http.post(f"{tm}/routes", json=route).status_code == 201
        payload = tmp_path / "traced.bad"
        payload.write_text("tampered")
        status, body = status_and_body(curl(cluster, "-T", str(payload), https_url(cluster, "")))
        assert status == 201, body

        def the_trace() -> list[ReceivedSpan] | None:
            spans = receiver.snapshot()
            failed = [s for s in spans if s.name == "step checksum"]
            if not failed:
                return None
            trace = [s for s in spans if s.trace_id == failed[0].trace_id]
            services = {s.service for s in trace}
            # Complete: parents end (and are exported) after their children.
            ids = {s.span_id for s in trace}
            linked = all(s.parent_span_id in ids for s in trace if s.parent_span_id)
            if linked and {"edge-proxy", "transaction-manager", "sentinel-link"} <= services:
                return trace
            return None

        trace = wait_until(the_trace, 60, "one trace over the edge, the TM and the sentinel link")

    by_name = {s.name: s for s in trace}
    # The failed step is an error; the step before it is not.
    assert by_name["step checksum"].status_code == STATUS_ERROR
    assert by_name["step copy"].status_code != STATUS_ERROR
    # The edge's partner request is the root: a SERVER span with HTTP attributes.
    root = next(s for s in trace if not s.parent_span_id)
    assert root.service == "edge-proxy" and root.kind == "SERVER"
    assert root.attributes.get("http.request.method", root.attributes.get("http.method")) == "PUT"
    assert [s for s in trace if not s.parent_span_id] == [root]  # one root: hops all linked
    # The messaging hops: the event and the transfer states, sent and processed.
    kinds = {(s.service, s.kind, s.attributes.get("messaging.destination.name")) for s in trace}
    assert ("transaction-manager", "PRODUCER", "events") in kinds
    assert ("transaction-manager", "CONSUMER", "events") in kinds
    assert ("transaction-manager", "PRODUCER", "transfer-states") in kinds
    assert ("sentinel-link", "CONSUMER", "transfer-states") in kinds
    assert any(s.service == "transaction-manager" and s.kind == "SERVER" for s in trace)
    consumer = next(s for s in trace if s.kind == "CONSUMER")
    assert consumer.attributes["messaging.system"] == "rabbitmq"
