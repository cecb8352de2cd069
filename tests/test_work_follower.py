"""The work follower: newest epoch wins, primary-only work fences itself on expiry."""

from __future__ import annotations

import time

import pytest

from ferrylink.cluster import WORK_EVENTS, WORK_SCHEDULER, Assignment
from ferrylink.consumer_manager import ConsumerManager
from ferrylink.fencing import Fenced, FencingToken
from ferrylink.messaging import Publisher
from ferrylink.work import FlagWork, WorkFollower
from tests.helpers import wait_until


def assignment(epoch: int, primary: str, ttl: float = 30.0, not_before: float = 0.0) -> Assignment:
    now = time.time()
    return Assignment(
        epoch=epoch, mode="active_active", leader="st1", primary=primary,
        work={primary: [WORK_EVENTS, WORK_SCHEDULER]},
        issued_at=now, not_before=not_before or now, expires_at=now + ttl,
    )  # fmt: skip


def make_follower() -> tuple[WorkFollower, FlagWork, FlagWork]:
    # Never started: only loops are switched here, no broker is needed.
    consumers = ConsumerManager(["amqp://unused"], Publisher(["amqp://unused"]))
    follower = WorkFollower("st2", consumers)
    scheduler, events = FlagWork(), FlagWork()
    follower.loops[WORK_SCHEDULER] = scheduler
    follower.loops[WORK_EVENTS] = events
    return follower, scheduler, events


def test_older_epochs_are_ignored() -> None:
    follower, scheduler, _ = make_follower()
    assert follower.offer(assignment(5, "st2"))
    assert scheduler.is_set
    assert not follower.offer(assignment(4, "st1"))  # stale: still primary under epoch 5
    assert scheduler.is_set and follower.epoch == 5
    assert follower.offer(assignment(6, "st1"))
    assert not scheduler.is_set


def test_expired_assignment_stops_primary_work_but_not_the_rest() -> None:
    follower, scheduler, events = make_follower()
    follower.start()
    try:
        follower.offer(assignment(1, "st2", ttl=0.5))
        assert scheduler.is_set and events.is_set
        wait_until(lambda: not scheduler.is_set, 5, "self-fencing")
        assert events.is_set
    finally:
        follower.stop()
    history = follower.status()["history"]
    fenced = [h for h in history if h["unit"] == WORK_SCHEDULER]
    assert len(fenced) == 1 and fenced[0]["epoch"] == 1 and fenced[0]["end"] is not None


def test_primary_work_waits_for_not_before() -> None:
    follower, scheduler, events = make_follower()
    follower.start()
    try:
        follower.offer(assignment(2, "st2", not_before=time.time() + 0.5))
        assert events.is_set and not scheduler.is_set
        wait_until(lambda: scheduler.is_set, 5, "the fence to lift")
    finally:
        follower.stop()
    assert not scheduler.is_set and not events.is_set  # stop() switches everything off


def test_an_assignment_arriving_during_shutdown_starts_nothing() -> None:
    # Seen in the chaos suite: a scheduler being stopped got its assignment re-sent by the
    # coordinator between "stopped scheduler.jobs" and its consumers closing, and started
    # its primary-only work again on its way out.
    follower, scheduler, events = make_follower()
    follower.start()
    follower.offer(assignment(1, "st2"))
    assert scheduler.is_set
    follower.stop()
    assert not scheduler.is_set and not events.is_set
    follower.offer(assignment(1, "st2"))
    assert not scheduler.is_set and not events.is_set
    assert follower.active() == []


# -- the grant primary-only work runs under (fencing) ------------------------------------------


def grant(primary: str = "st2", epoch: int = 7) -> Assignment:
    return Assignment(
        epoch=epoch, mode="active_active", leader="st1", primary=primary,
        work={primary: [WORK_EVENTS, WORK_SCHEDULER]},
        issued_at=100.0, not_before=100.0, expires_at=103.0,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("primary", "bounds", "refused_epoch", "refusal"),
    [
        ("st2", (101.0, 101.0), None, None),  # primary, within its grant
        ("st1", (101.0, 101.0), None, "not the primary"),
        ("st2", (102.5, 103.0), None, "ran out"),  # may have run out on the database's clock
        ("st2", (99.5, 100.5), None, "not begun"),  # may not have begun yet
        ("st2", (101.0, 101.0), 7, "refused epoch 7"),  # the database refused this epoch
        ("st2", (101.0, 101.0), 6, None),  # an older epoch's refusal does not count
    ],
)
def test_token_is_the_grant_this_node_surely_holds(
    primary: str,
    bounds: tuple[float, float],
    refused_epoch: int | None,
    refusal: str | None,
) -> None:
    follower, _, _ = make_follower()
    follower.clock = lambda: bounds
    if refused_epoch is not None and refused_epoch != 7:
        follower.offer(grant(epoch=refused_epoch))
        follower.fenced(FencingToken(refused_epoch, "st2"))
    follower.offer(grant(primary))
    if refused_epoch == 7:
        follower.fenced(FencingToken(7, "st2"))
    if refusal is None:
        assert follower.token() == FencingToken(7, "st2")
    else:
        with pytest.raises(Fenced, match=refusal):
            follower.token()


def test_no_token_before_any_assignment() -> None:
    follower, _, _ = make_follower()
    with pytest.raises(Fenced):
        follower.token()


def test_an_epoch_the_database_refused_stops_primary_work_until_a_newer_assignment() -> None:
    follower, scheduler, events = make_follower()
    follower.start()
    try:
        follower.offer(assignment(3, "st2"))
        token = follower.token()
        assert scheduler.is_set
        follower.fenced(token)  # a write found epoch 3 is not the database's any more
        wait_until(lambda: not scheduler.is_set, 5, "primary-only work to stop")
        assert events.is_set  # work for any number of servers goes on
        with pytest.raises(Fenced):
            follower.token()
        follower.offer(assignment(3, "st2"))  # the same epoch again: still refused
        assert not scheduler.is_set
        follower.offer(assignment(4, "st2"))  # a new grant (the leader changed, say)
        assert scheduler.is_set and follower.token() == FencingToken(4, "st2")
    finally:
        follower.stop()
    assert follower.status()["fenced_epoch"] == 3


def test_a_refusal_of_an_epoch_already_replaced_changes_nothing() -> None:
    follower, scheduler, _ = make_follower()
    follower.offer(assignment(3, "st2"))
    old = follower.token()
    follower.offer(assignment(4, "st2"))
    follower.fenced(old)
    assert scheduler.is_set and follower.token() == FencingToken(4, "st2")


@pytest.mark.parametrize("host_clock_off_by", [-3600.0, 3600.0])
def test_grants_are_judged_on_the_database_clock_not_the_hosts(
    monkeypatch: pytest.MonkeyPatch, host_clock_off_by: float
) -> None:
    """The coordinator issues grants on the database's clock: a host whose own clock is an
    hour behind (the grant not begun) or ahead (the grant long over) still runs it."""
    follower, scheduler, _ = make_follower()
    real_time = time.time
    follower.clock = lambda: (real_time(), real_time())  # the database's clock, as read
    database_now = real_time()
    monkeypatch.setattr(time, "time", lambda: real_time() + host_clock_off_by)
    follower.offer(Assignment(
        epoch=1, mode="active_active", leader="st1", primary="st2",
        work={"st2": [WORK_EVENTS, WORK_SCHEDULER]},
        issued_at=database_now, not_before=database_now, expires_at=database_now + 30,
    ))  # fmt: skip
    assert scheduler.is_set
    assert follower.token() == FencingToken(1, "st2")


class SlowStop(FlagWork):
    """Primary-only work whose stop takes a while (a POST in flight)."""

    def __init__(self, seen: list[tuple[str, list[str]]], follower: WorkFollower) -> None:
        super().__init__()
        self.seen, self.follower = seen, follower

    def stop(self) -> None:
        # Still reported active while it stops: the leader must not count it stopped yet.
        self.seen.append(("while stopping", self.follower.active()))
        super().stop()


def test_a_report_goes_out_at_a_new_epoch_and_when_primary_work_starts_or_stops() -> None:
    follower, _, _ = make_follower()
    seen: list[tuple[str, list[str]]] = []
    follower.loops[WORK_SCHEDULER] = SlowStop(seen, follower)
    follower.report_now = lambda: seen.append((f"report at {follower.epoch}", follower.active()))
    follower.offer(assignment(1, "st2"))  # primary: its work starts
    both = sorted([WORK_EVENTS, WORK_SCHEDULER])
    # Once as primary-only work started, once for the new epoch.
    assert seen == [("report at 1", both), ("report at 1", both)]
    seen.clear()
    follower.offer(assignment(1, "st2"))  # the same again: nothing to report
    assert seen == []
    follower.offer(assignment(2, "st1"))  # not primary any more
    # Stopped (st1 has all the work in this table), then the new epoch.
    assert seen == [("while stopping", both), ("report at 2", []), ("report at 2", [])]
