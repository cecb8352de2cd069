"""The reference's failover rules, row by row, on the pure decision functions."""

from __future__ import annotations

import pytest

from ferrylink.cluster import (
    PRIMARY_ONLY_WORK,
    WORK_DEAD_LETTERS_LOCAL,
    WORK_EVENTS,
    WORK_EVENTS_LOCAL,
    WORK_SCHEDULER,
    Assignment,
    decide_primary,
    desired_work,
    live_servers,
)

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
