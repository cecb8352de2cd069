"""Two copies of one event at once (two workers of one TM, and two TMs): the event's claim
lets one act; the other is parked in a delay queue and, back, finds the work done. Counted
at a real HTTP partner: one delivery per file, every leg in its final state."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferrylink.models import Partner
from tests.engine_support import Site, arrived, running_site
from tests.helpers import wait_until
from tests.http_sink import HttpSink

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]
EVENTS = 100


@pytest.fixture
def site(tmp_path: Path, prefix: str, amqp_url: str) -> Iterator[Site]:
    url = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    with running_site(tmp_path, prefix, amqp_url, url, ["st1", "st2"]) as running:
        yield running


def test_two_copies_at_once_deliver_once(site: Site, tmp_path: Path) -> None:
    with HttpSink(tmp_path / "sink") as sink:
        site.setup(
            [("*.dat", [{"kind": "push", "partner": "tracker"},
                        {"kind": "move", "folder": "done"}])],
            [Partner(name="tracker", protocol="http", url=sink.url)],
        )  # fmt: skip
        tms = [site.start_tm("st1"), site.start_tm("st2")]
        for tm in tms:
            tm.wait_consuming()
        events = []
        for i in range(EVENTS):
            (site.home / f"e{i:03d}.dat").write_bytes(f"file {i}\n".encode() * 100)
            events.append(arrived(f"e{i:03d}.dat"))
        site.publish(events, copies=2)
        ids = [e.id for e in events]
        wait_until(lambda: site.processed(ids) == EVENTS, 120, "every event processed")
        queues = [site.topology.queue("events"), *site.topology.delay_queues(
            site.topology.queue("events"))]  # fmt: skip
        wait_until(lambda: sum(site.queue_depth(q) for q in queues) == 0, 60,
                   "every copy settled")  # fmt: skip
        puts = [r for r in sink.requests if r.method == "PUT"]
        assert len(puts) == EVENTS, f"{len(puts)} PUTs for {EVENTS} files"
        assert sorted(p.name for p in sink.root.iterdir()) == sorted(
            f"e{i:03d}.dat" for i in range(EVENTS)
        )
        assert len(list((site.data_dir / "done").iterdir())) == EVENTS
        legs = site.legs()
        assert sorted((leg.leg, leg.status) for leg in legs) == sorted(
            [("receive", "RECEIVED"), ("push:0", "SENT"), ("route", "ROUTED")] * EVENTS
        )
        assert site.queue_depth(site.topology.dead_letter_queue(queues[0])) == 0
        # Copies did meet: some were turned away by a held claim.
        turned_away = sum(tm.log_path.read_text().count("holds its claim") for tm in tms)
        assert turned_away > 0


def test_a_push_longer_than_the_claim_lifetime_is_done_once(site: Site, tmp_path: Path) -> None:
    """A second copy of an event (redelivered when a broker connection dropped, say) comes
    while the first is pushing to a slow partner, for longer than the claim's lifetime: the
    first holder keeps its claim while it works (the claim keeper), so the copy is turned
    away again and again instead of pushing the file a second time."""
    lifetime = 1.0
    with HttpSink(tmp_path / "sink") as sink:
        site.setup(
            [("*.dat", [{"kind": "push", "partner": "slow"}, {"kind": "move", "folder": "done"}])],
            [Partner(name="slow", protocol="http", url=sink.url)],
        )  # fmt: skip
        tms = [site.start_tm("st1", claim_seconds=lifetime),
               site.start_tm("st2", claim_seconds=lifetime)]  # fmt: skip
        for tm in tms:
            tm.wait_consuming()
        (site.home / "big.dat").write_bytes(b"a large file\n" * 1000)
        event = arrived("big.dat")
        sink.hold()
        site.publish([event], copies=2)
        wait_until(lambda: sink.waiting == 1, 30, "the push under way")
        turned_away = lambda: sum(tm.log_path.read_text().count("holds its claim")  # noqa: E731
                                  for tm in tms)  # fmt: skip
        began = time.monotonic()
        # Four lifetimes, and the copy turned away more than once (it comes back from the
        # shortest delay queue every second): without renewals the claim would have run out
        # and the copy would be pushing too.
        wait_until(lambda: sink.waiting > 1 or time.monotonic() - began > 4 * lifetime, 30,
                   "four lifetimes")  # fmt: skip
        wait_until(lambda: sink.waiting > 1 or turned_away() >= 2, 60, "the copy turned away")
        assert sink.waiting == 1, "a second push began while the first was under way"
        sink.release()
        wait_until(lambda: site.processed([event.id]) == 1, 60, "the event processed")
        queues = [site.topology.queue("events"), *site.topology.delay_queues(
            site.topology.queue("events"))]  # fmt: skip
        wait_until(lambda: sum(site.queue_depth(q) for q in queues) == 0, 60,
                   "every copy settled")  # fmt: skip
        assert len([r for r in sink.requests if r.method == "PUT"]) == 1
        assert [p.name for p in sink.root.iterdir()] == ["big.dat"]
        assert [p.name for p in (site.data_dir / "done").iterdir()] == ["big.dat"]
