"""The sentinel link without a broker: pure rules (backoff, bounds, URLs), the link store on a
real SQLite file (seq per cycle, repeats, backlog bounds), and delivery to real HTTP receivers
(one of two down, then back)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session, select

from ferrylink.contracts import TransferState
from ferrylink.db import create_tables, make_engine
from ferrylink.models import SentinelEndpoint, SentinelLeg
from ferrylink_ops.tracking_sink import TrackingSink
from services.sentinel_link.api.endpoints import check_url
from services.sentinel_link.delivery import DeliveryLoop
from services.sentinel_link.link import LinkStore, becomes_current, retry_delay
from tests.helpers import wait_until


def state(cycle: str, leg: str, status: str, revision: int = 0) -> TransferState:
    return TransferState(
        leg_key=f"{cycle}:{leg}", cycle_id=cycle, event_id=cycle, leg=leg, state=status,
        account="acme", file_name="in/a.csv", bytes=3, direction="inbound", protocol="sftp",
        node="st1", at=datetime(2025, 1, 1, tzinfo=UTC), revision=revision,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("revision", "current", "becomes"),
    [
        (1, None, True),  # the leg's first state
        (2, 1, True),  # the next one
        (5, 2, True),  # states squashed in one commit leave gaps
        (2, 3, False),  # arrived after a later state: linked, superseded
        (1, 3, False),
        (0, 3, True),  # sent before revisions: cannot be placed, the last one wins as before
        (0, None, True),
        (1, 0, True),  # the leg's state from before revisions, then a revised one
    ],
)
def test_a_state_becomes_its_legs_current_unless_a_later_one_came_first(
    revision: int, current: int | None, becomes: bool
) -> None:
    assert becomes_current(revision, current) is becomes


@pytest.mark.parametrize(
    ("failures", "low", "high"),
    [(0, 0.0, 0.0), (1, 0.25, 0.5), (2, 0.5, 1.0), (3, 1.0, 2.0), (7, 15.0, 30.0),
     (8, 15.0, 30.0), (1000, 15.0, 30.0)],
)  # fmt: skip
def test_retry_delay_doubles_with_jitter_up_to_the_maximum(
    failures: int, low: float, high: float
) -> None:
    rng = random.Random(failures)
    delays = [retry_delay(failures, 0.5, 30.0, rng) for _ in range(200)]
    assert all(low <= d <= high for d in delays)
    if failures:
        assert len(set(delays)) > 100  # jittered, so endpoints do not retry in lockstep


@pytest.mark.parametrize(
    "url",
    ["ftp://x/y", "file:///etc/passwd", "javascript:alert(1)", "http://", "http://u:p@host/x",
     "http://host/a b", "http://host:99999/", "http://host/x\r\nX-Evil: 1", "//host/x",
     "http://host/x#frag"],
)  # fmt: skip
def test_hostile_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError):
        check_url(url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/track", "https://tracking.example/in?k=1"])
def test_plain_urls_pass(url: str) -> None:
    assert check_url(url) == url


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[LinkStore]:
    """On SQLite; `parametrize("store", ["postgresql"], indirect=True)` for PostgreSQL."""
    if getattr(request, "param", "sqlite") == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'link.db'}"
    engine = make_engine(url)
    create_tables(engine)
    yield LinkStore(engine, engine)
    engine.dispose()


def add_endpoint(store: LinkStore, name: str, url: str, **fields: Any) -> SentinelEndpoint:
    with Session(store.config) as session:
        endpoint = SentinelEndpoint(name=name, url=url, **fields)
        session.add(endpoint)
        session.commit()
        session.refresh(endpoint)
        return endpoint


def test_seq_per_cycle_in_consumption_order_and_repeats_dropped(store: LinkStore) -> None:
    endpoint = add_endpoint(store, "a", "http://127.0.0.1:1/")
    endpoints = store.endpoints()
    assert store.link_state(state("c1", "receive", "RECEIVING"), endpoints) == 1
    assert store.link_state(state("c2", "receive", "RECEIVING"), endpoints) == 1
    assert store.link_state(state("c1", "receive", "RECEIVED"), endpoints) == 2
    # A redelivered message: no new seq, nothing queued twice.
    assert store.link_state(state("c1", "receive", "RECEIVED"), endpoints) is None
    assert store.link_state(state("c1", "route", "ROUTED"), endpoints) == 3
    assert endpoint.id is not None
    batch = store.next_batch(endpoint.id, 10)
    assert [(r["cycle_id"], r["seq"], r["status"]) for _, r in batch] == [
        ("c1", 1, "RECEIVING"), ("c2", 1, "RECEIVING"), ("c1", 2, "RECEIVED"),
        ("c1", 3, "ROUTED"),
    ]  # fmt: skip
    assert batch[2][1]["id"] == "c1:receive:RECEIVED"
    assert store.undelivered_records() == 4
    store.delivered(endpoint.id, batch[1][0], 1.0)
    assert [r["seq"] for _, r in store.next_batch(endpoint.id, 10)] == [2, 3]
    assert store.status()[endpoint.id]["backlog"] == 2


def leg_row(store: LinkStore, leg_key: str) -> tuple[str, int, int]:
    with Session(store.link) as session:
        leg = session.get(SentinelLeg, leg_key)
        assert leg is not None
        return leg.status, leg.revision, leg.seq


@pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)
def test_a_state_that_arrives_after_a_later_one_is_linked_superseded(store: LinkStore) -> None:
    """SENDING (revision 1) published again after a nack reaches the link after SENT
    (revision 2): the receiver gets both, the late one marked, and the leg stays SENT. Also
    within one batch, and for a state whose later one is in the same batch."""
    endpoint = add_endpoint(store, "a", "http://127.0.0.1:1/")
    endpoints = store.endpoints()
    assert store.link_state(state("c1", "push:0", "SENT", 2), endpoints) == 1
    assert store.link_state(state("c1", "push:0", "SENDING", 1), endpoints) == 2
    assert leg_row(store, "c1:push:0") == ("SENT", 2, 1)
    batch = [
        state("c2", "push:0", "SENT", 2), state("c2", "push:0", "SENDING", 1),
        state("c3", "receive", "RECEIVING", 1), state("c3", "receive", "RECEIVED", 2),
    ]  # fmt: skip
    assert store.link_states(batch, endpoints) == [1, 2, 1, 2]
    assert leg_row(store, "c2:push:0") == ("SENT", 2, 1)
    assert leg_row(store, "c3:receive") == ("RECEIVED", 2, 2)
    assert endpoint.id is not None
    got = [(r["cycle_id"], r["status"], r["revision"], r["superseded"])
           for _, r in store.next_batch(endpoint.id, 10)]  # fmt: skip
    assert got == [
        ("c1", "SENT", 2, False), ("c1", "SENDING", 1, True),
        ("c2", "SENT", 2, False), ("c2", "SENDING", 1, True),
        ("c3", "RECEIVING", 1, False), ("c3", "RECEIVED", 2, False),
    ]  # fmt: skip


@pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)
def test_a_resubmitted_leg_reaching_a_state_again_is_a_new_record(store: LinkStore) -> None:
    """A push that failed, was resubmitted and failed again: the second SENDING and FAILED are
    new states (new revisions), not repeats; a redelivered one still is a repeat."""
    endpoint = add_endpoint(store, "a", "http://127.0.0.1:1/")
    endpoints = store.endpoints()
    attempts = [state("c1", "push:0", status, revision)
                for revision, status in enumerate(["SENDING", "FAILED", "SENDING", "FAILED",
                                                   "SENDING", "SENT"], start=1)]  # fmt: skip
    assert store.link_states(attempts, endpoints) == [1, 2, 3, 4, 5, 6]
    assert store.link_states(attempts[2:4], endpoints) == [None, None]
    assert leg_row(store, "c1:push:0") == ("SENT", 6, 6)
    assert endpoint.id is not None
    ids = [r["id"] for _, r in store.next_batch(endpoint.id, 10)]
    assert ids == [f"c1:push:0:{a.state.value}:{a.revision}" for a in attempts]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)
def test_a_batch_is_linked_in_order_as_if_one_by_one(store: LinkStore) -> None:
    """What a batch commit's message links: seqs continue each cycle across batches, a
    repeat inside the batch or from an earlier one gets none, the leg keeps its last state,
    and every endpoint gets every new record in order."""
    a = add_endpoint(store, "a", "http://127.0.0.1:1/")
    b = add_endpoint(store, "b", "http://127.0.0.1:2/")
    endpoints = store.endpoints()
    assert store.link_state(state("c1", "receive", "RECEIVED"), endpoints) == 1
    batch = [
        state("c1", "route", "TO_EXECUTE"),
        state("c2", "route", "TO_EXECUTE"),
        state("c1", "receive", "RECEIVED"),  # linked before
        state("c1", "route", "ROUTED"),
        state("c2", "route", "TO_EXECUTE"),  # a repeat in the batch
        state("c2", "route", "FAILED"),
    ]
    assert store.link_states(batch, endpoints) == [2, 1, None, 3, None, 2]
    assert store.link_states(batch, endpoints) == [None] * len(batch)  # redelivered
    assert store.link_states([state("c2", "push", "SENDING")], endpoints) == [3]
    for endpoint in (a, b):
        assert endpoint.id is not None
        queued = store.next_batch(endpoint.id, 20)
        assert [(r["cycle_id"], r["seq"], r["status"]) for _, r in queued] == [
            ("c1", 1, "RECEIVED"), ("c1", 2, "TO_EXECUTE"), ("c2", 1, "TO_EXECUTE"),
            ("c1", 3, "ROUTED"), ("c2", 2, "FAILED"), ("c2", 3, "SENDING"),
        ]  # fmt: skip
    with Session(store.link) as session:
        legs = {leg.leg_key: (leg.status, leg.seq) for leg in session.exec(select(SentinelLeg))}
    assert legs == {"c1:receive": ("RECEIVED", 1), "c1:route": ("ROUTED", 3),
                    "c2:route": ("FAILED", 2), "c2:push": ("SENDING", 3)}  # fmt: skip


def test_backlog_bounds_drop_the_oldest_and_count_them(store: LinkStore) -> None:
    small = add_endpoint(store, "small", "http://127.0.0.1:1/", max_backlog=3)
    big = add_endpoint(store, "big", "http://127.0.0.1:2/")
    for n in range(5):
        store.link_state(state(f"c{n}", "receive", "RECEIVED"), store.endpoints())
    assert small.id is not None and big.id is not None
    assert [r["cycle_id"] for _, r in store.next_batch(small.id, 10)] == ["c2", "c3", "c4"]
    assert store.status()[small.id]["dropped"] == 2
    assert store.status()[big.id]["backlog"] == 5 and store.status()[big.id]["dropped"] == 0
    # Age: everything older than max_age_seconds goes, counted.
    with Session(store.config) as session:
        row = session.get(SentinelEndpoint, big.id)
        assert row is not None
        row.max_age_seconds = 60
        session.add(row)
        session.commit()
        session.refresh(row)
        aged = row
    assert store.enforce_bounds(aged, time.time() + 3600) == 5
    assert store.status()[big.id]["dropped"] == 5 and store.status()[big.id]["backlog"] == 0


def test_bounds_hold_after_every_batch_without_a_check_for_each(
    store: LinkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bounds are checked against the database only once the linked records may have
    filled the endpoint's room (or a second passed), yet the backlog never exceeds the bound
    after a batch and every record past it is counted as dropped."""
    endpoint = add_endpoint(store, "down", "http://127.0.0.1:1/", max_backlog=50)
    assert endpoint.id is not None
    checks: list[float] = []
    enforce = store.enforce_bounds

    def counted(endpoint: SentinelEndpoint, now: float) -> int:
        checks.append(now)
        return enforce(endpoint, now)

    monkeypatch.setattr(store, "enforce_bounds", counted)
    batches = 20
    for b in range(batches):
        linked = [state(f"b{b}-{i}", "receive", "RECEIVED") for i in range(8)]
        store.link_states(linked, store.endpoints())
        assert store.status()[endpoint.id]["backlog"] <= 50
    assert store.status()[endpoint.id]["backlog"] == 50
    assert store.status()[endpoint.id]["dropped"] == batches * 8 - 50
    assert len(checks) < batches, len(checks)
    # What stays is the newest 50, in order.
    kept = [r["cycle_id"] for _, r in store.next_batch(endpoint.id, 100)]
    everything = [f"b{b}-{i}" for b in range(batches) for i in range(8)]
    assert kept == everything[-50:]


def test_one_endpoint_down_does_not_hold_the_other_and_gets_its_backlog(
    store: LinkStore,
) -> None:
    up, down = TrackingSink(), TrackingSink()
    down.stop()
    add_endpoint(store, "up", up.url, batch_size=7)
    add_endpoint(store, "down", down.url, batch_size=7)
    loop = DeliveryLoop(store, "st1", heartbeat_seconds=0.5, timeout=2.0,
                        backoff_initial=0.05, backoff_max=0.5, poll_seconds=0.05)  # fmt: skip
    loop.start()
    try:
        expected = []
        for n in range(40):
            for leg, status in (("receive", "RECEIVED"), ("route", "ROUTED")):
                store.link_state(state(f"c{n}", leg, status), store.endpoints())
                expected.append(f"c{n}:{leg}:{status}")
        wait_until(lambda: len(up.unique_states()) == len(expected), 30, "all at the up one")
        assert list(up.unique_states()) == expected  # in order
        assert not down.states()
        failing = {s["name"]: s for s in _status(store)}["down"]
        assert failing["backlog"] == len(expected) and failing["failures"] >= 1
        assert failing["last_error"] and failing["last_success_at"] is None
        wait_until(lambda: len(up.heartbeats()) >= 2, 10, "heartbeats every 0.5 s")

        down.start()
        wait_until(lambda: len(down.unique_states()) == len(expected), 30, "the backlog")
        assert list(down.unique_states()) == expected
        assert len(down.states()) == len(expected)  # nothing twice here (no crash)
        for cycle in down.by_cycle().values():
            assert [r["seq"] for r in cycle] == [1, 2]
        recovered = {s["name"]: s for s in _status(store)}["down"]
        wait_until(lambda: _status_of(store, "down")["failures"] == 0, 10, "reset")
        assert recovered["dropped"] == 0
    finally:
        loop.stop()
        up.stop()
        down.stop()


def _status(store: LinkStore) -> list[dict[str, Any]]:
    status = store.status()
    return [{"name": e.name} | status.get(e.id or 0, {}) for e in store.endpoints()]


def _status_of(store: LinkStore, name: str) -> dict[str, Any]:
    return {str(s["name"]): s for s in _status(store)}[name]


def all_at_once(actions: Sequence[Callable[[], object]]) -> list[BaseException]:
    """Run each action in its own thread, released together; the exceptions raised."""
    start = threading.Barrier(len(actions))
    errors: list[BaseException] = []

    def run(action: Callable[[], object]) -> None:
        try:
            start.wait(10)
            action()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(action,)) for action in actions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return errors


@pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)
def test_first_status_row_written_by_many_threads_at_once(store: LinkStore) -> None:
    """The consumer (bounds) and the delivery worker both write an endpoint's status; the
    first row is created by whichever comes first, at the end of the log, the other never
    fails on it, and no increment is lost; threads enforcing the bounds at once drop each
    record once and count it once."""
    rounds, threads = 10, 4
    for n in range(rounds):
        endpoint = add_endpoint(store, f"e{n}", "http://127.0.0.1:1/", max_backlog=1)
        assert endpoint.id is not None
        endpoint_id = endpoint.id
        store.link_state(state(f"before-{n}", "receive", "RECEIVED"), [])
        now = time.time()
        errors = all_at_once(
            [partial(store.failed, endpoint_id, "ConnectError", now)] * threads
            + [partial(store.enforce_bounds, endpoint, now)] * threads
        )
        assert not errors, errors
        status = store.status()[endpoint_id]
        assert status["failures"] == threads
        assert status["backlog"] == 0 and status["dropped"] == 0  # placed after `before-n`
        for c in range(threads + 1):
            store.link_state(state(f"c{n}-{c}", "receive", "RECEIVED"), [])
        errors = all_at_once([partial(store.enforce_bounds, endpoint, now)] * threads)
        assert not errors, errors
        status = store.status()[endpoint_id]
        # The bound keeps the newest one; the 4 older ones dropped once, counted once.
        assert status["dropped"] == threads and status["backlog"] == 1
        batch = store.next_batch(endpoint_id, 10)
        assert [r["cycle_id"] for _, r in batch] == [f"c{n}-{threads}"]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)
def test_two_linkers_at_once_append_in_commit_order_with_no_gap(store: LinkStore) -> None:
    """Two instances linking at once (an overlap around a failover): positions are taken
    after the highest committed one, a clash on one is linked again after the other's, so
    the log has no gap and no repeat, and every cycle's records are in seq order in it."""
    endpoint = add_endpoint(store, "a", "http://127.0.0.1:1/", max_backlog=10_000)
    assert endpoint.id is not None
    endpoints = store.endpoints()
    store.link_states([state("start", "receive", "RECEIVED")], endpoints)  # placed first
    other = LinkStore(store.config, store.link)
    rounds = 30

    def link(instance: LinkStore, name: str) -> None:
        for n in range(rounds):
            # Shared cycles: both instances number the same cycles' records.
            instance.link_states([state(f"c{n}", f"{name}{leg}", "RECEIVED")
                                  for leg in range(3)], endpoints)  # fmt: skip

    errors = all_at_once([partial(link, store, "x"), partial(link, other, "y")])
    assert not errors, errors
    log = store.next_batch(endpoint.id, 10_000)
    positions = [pos for pos, _ in log]
    assert positions == list(range(1, 2 + 2 * rounds * 3))  # "start", then both
    assert len({r["id"] for _, r in log}) == len(log)
    by_cycle: dict[str, list[int]] = {}
    for _, record in log:
        by_cycle.setdefault(record["cycle_id"], []).append(record["seq"])
    assert by_cycle.pop("start") == [1]
    assert all(seqs == list(range(1, 7)) for seqs in by_cycle.values()), by_cycle


def test_a_worker_records_its_position_less_often_than_it_posts(
    store: LinkStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Posting batch after batch, the worker records its position at most every
    RECORD_PERIOD_SECONDS (a write transaction each), and at once when the backlog is empty:
    every record arrives once and in order, and the backlog then reads 0."""
    sink = TrackingSink()
    endpoint_id = add_endpoint(store, "up", sink.url, batch_size=1).id
    assert endpoint_id is not None
    expected = [f"c{n}:receive:RECEIVED" for n in range(60)]
    store.link_states([state(f"c{n}", "receive", "RECEIVED") for n in range(60)],
                      store.endpoints())  # fmt: skip
    recorded: list[int | None] = []
    delivered = store.delivered

    def counted(endpoint_id: int, through: int | None, now: float) -> None:
        recorded.append(through)
        delivered(endpoint_id, through, now)

    monkeypatch.setattr(store, "delivered", counted)
    loop = DeliveryLoop(store, "st1", heartbeat_seconds=3600, timeout=2.0,
                        backoff_initial=0.05, backoff_max=0.5, poll_seconds=0.05)  # fmt: skip
    loop.start()
    try:
        wait_until(lambda: store.status()[endpoint_id]["backlog"] == 0, 30, "all recorded")
    finally:
        loop.stop()
        sink.stop()
    assert list(sink.unique_states()) == expected and len(sink.states()) == len(expected)
    assert sink.batches >= len(expected)  # one record a POST
    positions = [p for p in recorded if p is not None]
    assert positions == sorted(positions) and len(positions) < len(expected) / 2, positions
    assert store.status()[endpoint_id]["delivered"] == len(expected)
