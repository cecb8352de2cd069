"""How a consumer's acks go out (`consumer_manager._send_acks`): the oldest run of its
unsettled deliveries in one frame, the rest one by one, never covering a delivery that is
not being acked."""

from __future__ import annotations

import queue
from typing import Any

import pytest

from ferrylink.consumer_manager import ConsumerSpec, _RunningConsumer, _send_acks


class RecordingChannel:
    def __init__(self) -> None:
        self.acks: list[tuple[int, bool]] = []

    def basic_ack(self, tag: int, multiple: bool = False) -> None:
        self.acks.append((tag, multiple))


def running(unsettled: set[int]) -> tuple[_RunningConsumer, RecordingChannel]:
    channel = RecordingChannel()
    spec = ConsumerSpec(name="events", queue="q", handler=lambda _delivery: None)
    consumer = _RunningConsumer(spec=spec, channel=channel,
                                consumer_tag="t", work=queue.Queue(), threads=[])  # fmt: skip
    consumer.unsettled = set(unsettled)
    return consumer, channel


@pytest.mark.parametrize(
    ("unsettled", "tags", "frames", "left"),
    [
        # One worker's batch is the oldest: one frame for all of it.
        ({1, 2, 3, 4, 5, 6}, {1, 2, 3}, [(3, True)], {4, 5, 6}),
        # The other worker's later batch while the first still holds 1-3: one by one.
        ({1, 2, 3, 4, 5, 6}, {4, 5, 6}, [(4, False), (5, False), (6, False)], {1, 2, 3}),
        # Gaps left by earlier settles do not matter: what is unsettled counts.
        ({2, 3, 5}, {2, 3, 5}, [(5, True)], set()),
        # A delivery in the middle not being acked (nacked, or still handled) stops the run.
        ({1, 2, 3}, {1, 3}, [(1, True), (3, False)], {2}),
        ({7}, {7}, [(7, True)], set()),
        ({1, 2}, set(), [], {1, 2}),
    ],
)  # fmt: skip
def test_acks_cover_only_what_is_acked(
    unsettled: set[int], tags: set[int], frames: list[tuple[int, bool]], left: set[int]
) -> None:
    consumer, channel = running(unsettled)
    _send_acks(consumer, tags)
    assert channel.acks == frames
    assert consumer.unsettled == left


def test_a_multiple_ack_never_covers_a_delivery_left_unhandled() -> None:
    """Deliveries the cancel left for the channel's close stay unsettled: a later batch's
    acks go one by one past them."""
    consumer, channel = running({1, 2, 3, 4})  # 1 and 2: dropped at a cancel, never handled
    _send_acks(consumer, {3, 4})
    assert channel.acks == [(3, False), (4, False)]
    acked: Any = {tag for tag, _multiple in channel.acks}
    assert not acked & {1, 2}
