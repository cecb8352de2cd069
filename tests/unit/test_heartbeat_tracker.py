"""The coordinator's heartbeat tracker: a process reports from two threads (its period, and
at once when its work changed), so an older report arriving later must not undo a newer one;
a restarted process (another pid) is heard whatever its clock says."""

from __future__ import annotations

from ferrylink.cluster import WORK_SENTINEL_LINK, Heartbeat
from services.cluster_coordinator.coordinator import HeartbeatTracker


def beat(pid: int, sent_at: float, *active: str) -> Heartbeat:
    return Heartbeat(node="st2", service="sentinel-link", pid=pid, sent_at=sent_at,
                     epoch=8, active=list(active))  # fmt: skip


def heard(tracker: HeartbeatTracker) -> tuple[float, list[str]]:
    at, heartbeat = tracker.snapshot()[("st2", "sentinel-link")]
    return at, heartbeat.active


def test_an_older_report_arriving_later_is_ignored() -> None:
    tracker = HeartbeatTracker()
    tracker.record(beat(100, 10.0), now=50.0)  # sent at once: the work stopped
    tracker.record(beat(100, 9.5, WORK_SENTINEL_LINK), now=50.1)  # the period's, sent before
    assert heard(tracker) == (50.0, [])


def test_a_newer_report_and_a_restarted_process_are_taken() -> None:
    tracker = HeartbeatTracker()
    tracker.record(beat(100, 10.0, WORK_SENTINEL_LINK), now=50.0)
    tracker.record(beat(100, 11.0), now=51.0)
    assert heard(tracker) == (51.0, [])
    tracker.record(beat(200, 5.0, WORK_SENTINEL_LINK), now=52.0)  # a new process
    assert heard(tracker) == (52.0, [WORK_SENTINEL_LINK])
