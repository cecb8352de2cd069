"""Retries that park nothing healthy: consumers cancelled and restarted 20 times mid-stream
(every cancel returns prefetched messages, and the broker counts each return), and the
database unreachable for 10 s (infrastructure errors back off through delay queues without
counting attempts). Then everything is processed, nothing is dead-lettered."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pika
import pytest

from ferrylink.cluster import WORK_EVENTS, Assignment
from tests.engine_support import Site, arrived, running_site
from tests.helpers import wait_until
from tests.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]
ROUTE = [("*.dat", [{"kind": "move", "folder": "done"}])]
BACKLOG = 1000


def _events(site: Site, count: int, first: int = 0) -> list[str]:
    events = []
    for i in range(first, first + count):
        (site.home / f"e{i:05d}.dat").write_bytes(b"x" * 100)
        events.append(arrived(f"e{i:05d}.dat"))
    site.publish(events)
    return [e.id for e in events]


def _settled(site: Site, ids: list[str]) -> None:
    wait_until(lambda: site.processed(ids) == len(ids), 120, "every event processed")
    queue = site.topology.queue("events")
    assert site.queue_depth(site.topology.dead_letter_queue(queue)) == 0
    assert len(list((site.data_dir / "done").iterdir())) == len(ids)


def test_twenty_consumer_cancels_park_nothing(tmp_path: Path, prefix: str, amqp_url: str) -> None:
    url = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    with running_site(tmp_path, prefix, amqp_url, url, ["st1"]) as site:
        site.setup(ROUTE)
        tm = site.start_tm("st1", workers=2, FERRYLINK_PREFETCH="50",
                           FERRYLINK_EVENT_BATCH="16").wait_consuming()  # fmt: skip
        ids = _events(site, BACKLOG)
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = connection.channel()
        cancels = 0
        for epoch in range(2, 42):
            on = epoch % 2 == 1
            if on and len(ids) - site.processed(ids) < BACKLOG:
                # Batches are fast: a backlog at every switch, so each cancel returns
                # prefetched messages.
                ids += _events(site, BACKLOG, first=len(ids))
            now = time.time()
            assignment = Assignment(epoch=epoch, mode="active_active", leader="st1",
                                    primary="st1", work={"st1": [WORK_EVENTS] if on else []},
                                    issued_at=now, not_before=0, expires_at=now + 3600)  # fmt: skip
            channel.basic_publish(site.topology.exchange("assignments"), "",
                                  assignment.model_dump_json().encode())  # fmt: skip

            def switched(on: bool = on) -> bool:
                work = httpx.get(f"{tm.url}/work", headers=site.admin, timeout=5).json()
                return (WORK_EVENTS in work["active"]) == on

            wait_until(switched, 10, f"consumer {'on' if on else 'off'} at epoch {epoch}")
            cancels += not on
        connection.close()
        assert cancels == 20
        assert site.processed(ids) < len(ids), "the stream ended before the cancels"
        _settled(site, ids)


def test_database_unreachable_for_ten_seconds_parks_nothing(
    tmp_path: Path, prefix: str, amqp_url: str, postgres_url: str
) -> None:
    proxy = TcpProxy("127.0.0.1", 5432).start()
    behind_proxy = postgres_url.replace("@127.0.0.1/", f"@127.0.0.1:{proxy.port}/")
    try:
        with running_site(tmp_path, prefix, amqp_url, behind_proxy, ["st1"]) as site:
            site.setup(ROUTE)
            tm = site.start_tm("st1").wait_consuming()
            # Enough that the transaction manager is still at it when the database goes (300
            # were all done between two polls on a quiet machine).
            ids = _events(site, 3000)
            wait_until(lambda: site.processed(ids) > 0, 60, "processing under way")
            assert site.processed(ids) < len(ids), "all processed before the outage"
            proxy.cut()
            cut_at = time.monotonic()
            wait_until(lambda: time.monotonic() - cut_at >= 10, 11, "10 s of outage",
                       interval=0.5)  # fmt: skip
            proxy.restore()
            _settled(site, ids)
            # The outage was felt, and retried without counting attempts.
            log = tm.log_path.read_text()
            assert "cannot claim" in log or "infrastructure:" in log
            assert "failed (attempt" not in log
    finally:
        proxy.stop()
