"""A broker node SIGKILLed in a 3-node cluster: publishers and consumers reconnect to the
survivors and every confirmed message is consumed."""

from __future__ import annotations

import json
import threading
from collections import Counter
from concurrent.futures import Future

import pytest

from ferrylink.consumer_manager import ConsumerManager, ConsumerSpec, Delivery
from ferrylink.messaging import Publisher, Topology
from tests.helpers import wait_until

pytestmark = pytest.mark.fault


def test_node_kill_loses_no_confirmed_message(broker_cluster: list) -> None:
    urls = [node.url for node in broker_cluster]
    topology = Topology(prefix="fault", delivery_limit=20)
    seen: Counter[str] = Counter()
    lock = threading.Lock()

    def handler(delivery: Delivery) -> None:
        with lock:
            seen[json.loads(delivery.body)["id"]] += 1

    # Both connect to the first URL first: the node we kill.
    publisher = Publisher(urls, declare=topology.declare).start()
    manager = ConsumerManager(urls, publisher, declare=topology.declare, delivery_limit=20)
    manager.register(ConsumerSpec("events", topology.queue("events"), handler, workers=2))
    manager.set_active({"events"})
    manager.start()
    total = 3000
    futures: dict[str, Future[None]] = {}
    try:
        assert publisher.wait_connected(30)
        wait_until(lambda: manager.active() == {"events"}, timeout=30)
        for i in range(total):
            message_id = f"m{i}"
            futures[message_id] = publisher.publish(
                "",
                topology.queue("events"),
                json.dumps({"id": message_id}).encode(),
                message_id=message_id,
            )
            if i == total // 3:
                wait_until(lambda: len(seen) > 100, timeout=30, what="consumption under way")
                broker_cluster[0].kill()
        # Publishing resumes on a surviving node; every message is eventually confirmed.
        confirmed = set()
        for message_id, future in futures.items():
            future.result(timeout=120)
            confirmed.add(message_id)
        assert len(confirmed) == total
        wait_until(
            lambda: confirmed <= set(seen), timeout=120, what="every confirmed message consumed"
        )
        assert publisher.connected and manager.connected
        # Both really lost their node and came back on another one.
        assert publisher.connections_opened >= 2
        assert manager.connections_opened >= 2
    finally:
        manager.stop()
        publisher.close()
    # Redeliveries are allowed (at-least-once), losses are not.
    assert set(seen) == confirmed
