"""The failover benchmark's cluster timing for a connection timeout (bench.failover.timing_for):
the product's defaults at 5 s, scaled down below it, and always a lease shorter than the
timeout (a cut-off primary stops before another is promoted) with several heartbeats in it."""

from __future__ import annotations

import pytest

from bench.failover import timing_for


@pytest.mark.parametrize(
    ("timeout", "lease", "heartbeat", "margin"),
    [
        (5.0, "3", "1", "1"),  # the defaults of the coordinator's and the services' settings
        (10.0, "3", "1", "1"),  # never above them
        (2.0, "1.2", "0.5", "0.4"),
        (1.0, "0.6", "0.25", "0.2"),
    ],
)
def test_timing_for(timeout: float, lease: str, heartbeat: str, margin: str) -> None:
    timing = timing_for(timeout)
    assert timing == {
        "FERRYLINK_CONNECTION_TIMEOUT": f"{timeout:g}",
        "FERRYLINK_LEASE_SECONDS": lease,
        "FERRYLINK_HEARTBEAT_INTERVAL": heartbeat,
        "FERRYLINK_FENCE_MARGIN_SECONDS": margin,
    }
    assert float(lease) < timeout and 4 * float(heartbeat) <= timeout
