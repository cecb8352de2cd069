"""The reference's failover rules, row by row, on the pure decision functions."""

from __future__ import annotations

import pytest

from ferrylink.cluster import (
    PRIMARY_ONLY_WORK,
    WORK_DEAD_LETTERS_LOCAL,
    WORK_EVENTS,
    WORK_EVENTS_LOCAL,
    WORK_SCHEDULER,
    WORK_SENTINEL_LINK,
    Assignment,
    ServiceReport,
    decide_primary,
    desired_work,
    grant_expiry,
    handover_not_before,
    handover_waits_for,
    hold_primary_work,
    live_servers,
)
from ferrylink.fencing import ClockReading, better_reading, clock_bounds

SERVERS = ["st1", "st2", "st3"]
ALL = set(SERVERS)
TIMEOUT = 5.0


def decide(
    live: set[str],
    current: str | None,
    mode: str = "active_active",
    synchronized: set[str] | None = None,
    leading_for: float = 100.0,
) -> str | None:
    return decide_primary(
        SERVERS,
        live,
        ALL if synchronized is None else synchronized,
        mode,
        current,
        leading_for,
        TIMEOUT,
    ).primary


def test_liveness_uses_the_connection_timeout() -> None:
    heard = {"st1": 100.0, "st2": 96.0, "st3": 94.9}
    assert live_servers(SERVERS, heard, now=101.0, timeout=5.0) == {"st1", "st2"}
    assert live_servers(SERVERS, {}, now=1.0, timeout=5.0) == set()


@pytest.mark.parametrize("mode", ["active_active", "passive", "passive_legacy"])
def test_first_listed_live_server_becomes_primary_at_start(mode: str) -> None:
    assert decide(ALL, None, mode, leading_for=0.0) == "st1"


@pytest.mark.parametrize("mode", ["active_active", "passive", "passive_legacy"])
def test_start_without_first_server_waits_for_the_timeout_then_takes_next(mode: str) -> None:
    assert decide({"st2", "st3"}, None, mode, leading_for=1.0) is None
    assert decide({"st2", "st3"}, None, mode, leading_for=TIMEOUT) == "st2"
    assert decide({"st3"}, None, mode, leading_for=TIMEOUT) == "st3"


@pytest.mark.parametrize("mode", ["active_active", "passive", "passive_legacy"])
def test_live_primary_stays(mode: str) -> None:
    assert decide(ALL, "st1", mode) == "st1"


@pytest.mark.parametrize("mode", ["active_active", "passive"])
def test_lost_primary_is_replaced_by_the_next_live_server_in_list_order(mode: str) -> None:
    assert decide({"st2", "st3"}, "st1", mode) == "st2"
    # the next one down the list when the second is down too
    assert decide({"st3"}, "st1", mode) == "st3"
    # a promoted secondary that fails hands over to the next live one
    assert decide({"st3"}, "st2", mode) == "st3"


@pytest.mark.parametrize("mode", ["active_active", "passive"])
def test_unsynchronized_server_is_not_promoted(mode: str) -> None:
    assert decide({"st2", "st3"}, "st1", mode, synchronized={"st3"}) == "st3"


@pytest.mark.parametrize("mode", ["active_active", "passive"])
def test_fail_back_to_the_first_server_once_live_and_synchronized(mode: str) -> None:
    assert decide(ALL, "st2", mode) == "st1"
    assert decide(ALL, "st2", mode, synchronized={"st2", "st3"}) == "st2"


def test_fail_back_is_only_to_the_first_listed_server() -> None:
    # st2 comes back while st3 is primary: st3 stays (only the first listed server reclaims).
    assert decide({"st2", "st3"}, "st3") == "st3"


def test_passive_legacy_never_promotes_or_fails_back_by_itself() -> None:
    decision = decide_primary(SERVERS, {"st2", "st3"}, ALL, "passive_legacy", "st1", 100.0, TIMEOUT)
    assert decision.primary == "st1"
    assert "manual failover" in decision.reason
    assert decide(ALL, "st2", "passive_legacy") == "st2"


def test_no_live_server_means_no_primary_in_automatic_modes() -> None:
    assert decide(set(), "st1") is None


def test_primary_removed_from_the_list_is_replaced() -> None:
    decision = decide_primary(["st2", "st3"], ALL, ALL, "active_active", "st1", 100.0, TIMEOUT)
    assert decision.primary == "st2"


def test_empty_servers_list() -> None:
    assert decide_primary([], ALL, ALL, "passive", "st1", 100.0, TIMEOUT).primary is None


def test_work_table_active_active() -> None:
    work = desired_work("active_active", SERVERS, {"st1", "st2"}, ALL, "st1")
    assert work["st1"] == [WORK_EVENTS, *sorted(PRIMARY_ONLY_WORK)]
    assert work["st2"] == [WORK_EVENTS]
    assert work["st3"] == []  # down


@pytest.mark.parametrize(
    ("mode", "primary", "paused", "consumers"),
    [
        ("active_active", "st1", {"st2"}, {"st1", "st3"}),
        ("active_active", "st1", {"st1"}, {"st2", "st3"}),  # the primary pauses events only
        ("passive", "st1", {"st2"}, {"st1"}),  # a standby's pause changes nothing yet
        ("passive", "st1", {"st1"}, set()),  # pausing the passive primary stops events
        ("passive_legacy", "st1", {"st3"}, {"st1", "st2"}),
        ("active_active", "st1", set(), {"st1", "st2", "st3"}),
    ],
)
def test_work_table_paused_servers_consume_no_events(
    mode: str, primary: str, paused: set[str], consumers: set[str]
) -> None:
    work = desired_work(mode, SERVERS, ALL, ALL, primary, paused)
    events = {WORK_EVENTS, WORK_EVENTS_LOCAL}
    assert {s for s in SERVERS if events & set(work[s])} == consumers
    # Its other work goes on: the primary keeps the primary's work, paused or not.
    assert set(work[primary]) >= PRIMARY_ONLY_WORK


def test_work_table_active_active_skips_unsynchronized() -> None:
    work = desired_work("active_active", SERVERS, ALL, {"st1", "st2"}, "st1")
    assert work["st3"] == []


@pytest.mark.parametrize(
    ("mode", "primary", "consumers"),
    [
        ("active_active", "st1", {"st1", "st2"}),
        ("passive", "st1", {"st1"}),
        ("passive", "st3", set()),  # an out-of-sync primary (kept in passive) consumes nothing
        ("passive_legacy", "st1", {"st1", "st2"}),
        ("passive_legacy", "st3", {"st1", "st2"}),
    ],
)
def test_work_table_no_events_before_sync(mode: str, primary: str, consumers: set[str]) -> None:
    """A live server that is not synchronized (st3) consumes no events in any mode."""
    work = desired_work(mode, SERVERS, ALL, {"st1", "st2"}, primary)
    events = {WORK_EVENTS, WORK_EVENTS_LOCAL}
    assert {s for s in SERVERS if events & set(work[s])} == consumers


def test_work_table_passive() -> None:
    work = desired_work("passive", SERVERS, ALL, ALL, "st2")
    assert work["st2"] == [WORK_EVENTS, *sorted(PRIMARY_ONLY_WORK)]
    assert work["st1"] == [] and work["st3"] == []


def test_work_table_passive_legacy() -> None:
    work = desired_work("passive_legacy", SERVERS, ALL, ALL, "st1")
    assert work["st1"] == [WORK_EVENTS_LOCAL, WORK_DEAD_LETTERS_LOCAL, *sorted(PRIMARY_ONLY_WORK)]
    assert work["st2"] == [WORK_EVENTS_LOCAL, WORK_DEAD_LETTERS_LOCAL]
    # A live server not yet in sync keeps its own dead letters, consumes no events.
    work = desired_work("passive_legacy", SERVERS, ALL, {"st1"}, "st1")
    assert work["st2"] == [WORK_DEAD_LETTERS_LOCAL]
    # A server not heard runs nothing.
    work = desired_work("passive_legacy", SERVERS, {"st1"}, ALL, "st1")
    assert work["st2"] == [] and work["st3"] == []


def make_assignment(**overrides: object) -> Assignment:
    values: dict[str, object] = dict(
        epoch=3,
        mode="active_active",
        leader="st2",
        primary="st1",
        work={"st1": [WORK_EVENTS, WORK_SCHEDULER], "st2": [WORK_EVENTS]},
        issued_at=100.0,
        not_before=100.0,
        expires_at=103.0,
    )
    values.update(overrides)
    return Assignment.model_validate(values)


def test_assignment_self_fences_primary_work_when_expired() -> None:
    assignment = make_assignment()
    assert assignment.work_for("st1", 101.0) == {WORK_EVENTS, WORK_SCHEDULER}
    assert assignment.work_for("st1", 103.0) == {WORK_EVENTS}
    assert assignment.work_for("st3", 101.0) == set()


def test_assignment_holds_primary_work_until_not_before() -> None:
    assignment = make_assignment(not_before=102.0)
    assert assignment.work_for("st1", 101.0) == {WORK_EVENTS}
    assert assignment.work_for("st1", 102.5) == {WORK_EVENTS, WORK_SCHEDULER}


# -- grants on the database clock (fencing) -----------------------------------------------------


@pytest.mark.parametrize(
    ("earliest", "latest", "expected"),
    [
        (101.0, 101.0, {WORK_EVENTS, WORK_SCHEDULER}),  # surely within the grant
        (101.0, 102.9, {WORK_EVENTS, WORK_SCHEDULER}),  # uncertain, but surely before expiry
        (101.0, 103.0, {WORK_EVENTS}),  # may have run out: fenced
        (102.9, 103.2, {WORK_EVENTS}),
        (99.9, 100.5, {WORK_EVENTS}),  # may not have begun (not_before 100.0): not yet
        (100.0, 100.5, {WORK_EVENTS, WORK_SCHEDULER}),
    ],
)
def test_primary_work_only_when_the_grant_has_surely_begun_and_not_run_out(
    earliest: float, latest: float, expected: set[str]
) -> None:
    assert make_assignment().work_for("st1", earliest, latest) == expected


@pytest.mark.parametrize(
    ("lease_expiry", "now", "heard_age", "lease", "expected"),
    [
        (103.0, 100.0, 0.0, 3.0, 103.0),  # heard just now: the leader's lease bounds it
        (103.0, 100.0, 1.0, 3.0, 102.0),  # heard a second ago: a lease past that
        (103.0, 100.0, 5.0, 3.0, 98.0),  # silent past a lease: already run out
        (103.0, 100.0, None, 3.0, 100.0),  # never heard: no time at all
        (101.0, 100.0, 0.0, 3.0, 101.0),  # the leader's own lease runs out first
        (103.0, 100.0, -0.5, 3.0, 103.0),  # heard "in the future" (clock step): no extra time
    ],
)
def test_grant_expiry(
    lease_expiry: float, now: float, heard_age: float | None, lease: float, expected: float
) -> None:
    assert grant_expiry(lease_expiry, now, heard_age, lease) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("now", "issued_until", "margin", "expected"),
    [
        (100.0, 90.0, 1.0, 100.0),  # every old grant ran out long ago: start now
        (100.0, 99.5, 1.0, 100.5),  # ran out just now: the margin still holds
        (100.0, 103.0, 1.0, 104.0),  # fail-back: the old primary's grant is still running
        (100.0, 103.0, 0.0, 103.0),
        (100.0, 0.0, 1.0, 100.0),  # a new cluster
    ],
)
def test_a_new_primary_starts_after_every_old_grant_plus_the_margin(
    now: float, issued_until: float, margin: float, expected: float
) -> None:
    assert handover_not_before(now, issued_until, margin) == pytest.approx(expected)


def report(age: float, epoch: int | None, *active: str) -> ServiceReport:
    return ServiceReport(age, epoch, list(active))


SL = "sentinel-link"


@pytest.mark.parametrize(
    ("reports", "expected"),
    [
        # st2, primary until epoch 8, still stops its sentinel link: wait for it.
        ({"st2": {SL: report(0.4, 8, WORK_SENTINEL_LINK, WORK_EVENTS)}},
         [f"st2/{SL}: runs {WORK_SENTINEL_LINK}"]),
        # It stopped, and says so at epoch 8: nothing to wait for.
        ({"st2": {SL: report(0.1, 8, WORK_EVENTS)}}, []),
        # Its last report is from before epoch 8: it may have started work since.
        ({"st2": {SL: report(0.1, 7, WORK_EVENTS)}}, [f"st2/{SL}: has not reported epoch 8 yet"]),
        ({"st2": {SL: report(0.1, None)}}, [f"st2/{SL}: has not reported epoch 8 yet"]),
        # Another server (never the old primary) need not report the epoch, only stop.
        ({"st3": {SL: report(0.1, 7)}}, []),
        ({"st3": {SL: report(0.1, 7, WORK_SENTINEL_LINK)}},
         [f"st3/{SL}: runs {WORK_SENTINEL_LINK}"]),
        # The primary's own work is not waited for.
        ({"st1": {"scheduler": report(0.1, 7, WORK_SCHEDULER)}}, []),
        # Unheard for the connection timeout (dead, frozen, cut off): the time rule decides.
        ({"st2": {SL: report(TIMEOUT + 0.1, 7, WORK_SENTINEL_LINK)}}, []),
        # Heard just within it: still waited for.
        ({"st2": {SL: report(TIMEOUT, 8, WORK_SENTINEL_LINK)}},
         [f"st2/{SL}: runs {WORK_SENTINEL_LINK}"]),
        # Event consumers run everywhere in active_active: never a reason to wait.
        ({"st2": {"transaction-manager": report(0.1, 8, WORK_EVENTS)},
          "st3": {"transaction-manager": report(0.1, 7, WORK_EVENTS)}}, []),
        ({}, []),
    ],
)  # fmt: skip
def test_what_a_new_primary_waits_for(
    reports: dict[str, dict[str, ServiceReport]], expected: list[str]
) -> None:
    # st1 is the new primary at epoch 8; st2 was primary before.
    assert handover_waits_for("st1", "st2", 8, reports, TIMEOUT) == expected


@pytest.mark.parametrize(
    ("primary_changed", "held_before", "waiting", "hold"),
    [
        (True, False, True, True),  # a handover with something to wait for: wait
        (True, False, False, False),  # the old primary is down, or stopped already: go
        (False, True, True, True),  # still waiting for it
        (False, True, False, False),  # it stopped: go
        # A primary that works already is not stopped by what a woken-up old one reports
        # (that one is fenced by its grant and by the database).
        (False, False, True, False),
        (False, False, False, False),
    ],
)
def test_a_new_primary_waits_while_there_is_something_to_wait_for(
    primary_changed: bool, held_before: bool, waiting: bool, hold: bool
) -> None:
    assert hold_primary_work(primary_changed, held_before, waiting) is hold


def test_work_table_holds_only_the_primarys_primary_only_work() -> None:
    work = desired_work("passive", SERVERS, ALL, ALL, "st1", hold_primary_only=True)
    assert work["st1"] == [WORK_EVENTS]
    assert work == {**desired_work("passive", SERVERS, ALL, ALL, "st1"), "st1": [WORK_EVENTS]}


@pytest.mark.parametrize(
    ("reading", "monotonic_now", "expected"),
    [
        # Read at once (sent == received): the database's time moves with ours.
        (ClockReading(10.0, 10.0, 1000.0), 10.0, (1000.0, 1000.0)),
        # A 0.2 s round trip: the reading was taken somewhere within it.
        (ClockReading(10.0, 10.2, 1000.0), 10.2, (1000.0, 1000.2)),
        # ... and 5 s later, with 5.2 s of possible drift at 500 ppm.
        (ClockReading(10.0, 10.2, 1000.0), 15.2, (1005.0 - 0.0026, 1005.2 + 0.0026)),
        # 100 s later: the clocks may have drifted apart by 500 ppm.
        (ClockReading(10.0, 10.0, 1000.0), 110.0, (1099.95, 1100.05)),
    ],
)
def test_database_clock_bounds(
    reading: ClockReading, monotonic_now: float, expected: tuple[float, float]
) -> None:
    assert clock_bounds(reading, monotonic_now) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("old", "new", "kept"),
    [
        (None, ClockReading(10.0, 10.5, 0.0), "new"),
        (ClockReading(10.0, 10.1, 0.0), ClockReading(20.0, 20.05, 0.0), "new"),  # tighter
        (ClockReading(10.0, 10.1, 0.0), ClockReading(20.0, 21.0, 0.0), "old"),  # a slow read
        (ClockReading(10.0, 10.1, 0.0), ClockReading(70.0, 71.0, 0.0), "new"),  # old too old
    ],
)
def test_the_tighter_database_clock_reading_is_kept(
    old: ClockReading | None, new: ClockReading, kept: str
) -> None:
    assert better_reading(old, new, max_age=60.0) == (new if kept == "new" else old)


def test_a_coarse_database_clock_widens_the_latest_bound() -> None:
    # SQLite truncates its clock to the millisecond: the true time may be up to 1 ms later.
    assert clock_bounds(ClockReading(10.0, 10.0, 1000.0, 0.001), 10.0) == pytest.approx(
        (1000.0, 1000.001), abs=1e-9
    )
