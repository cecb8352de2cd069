"""The work follower: newest epoch wins, primary-only work fences itself on expiry."""

from __future__ import annotations

import time

from ferrylink.cluster import WORK_EVENTS, WORK_SCHEDULER, Assignment
from ferrylink.consumer_manager import ConsumerManager
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
