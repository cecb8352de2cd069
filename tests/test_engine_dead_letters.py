"""Dead letters: the listing carries metadata and a bounded preview (a 5 MB poison message
does not make a 5 MB listing), the body has its own endpoint, and a replayed message that
dies again at once is kept again (replay marks before it publishes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pika
import pytest

from tests.engine_support import running_site
from tests.helpers import wait_until

pytestmark = [pytest.mark.fault, pytest.mark.timeout(300)]


def test_dead_letters_listed_small_body_apart_replay_kept(
    tmp_path: Path, prefix: str, amqp_url: str
) -> None:
    url = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    with running_site(tmp_path, prefix, amqp_url, url, ["st1"]) as site:
        site.setup([])
        tm = site.start_tm("st1").wait_consuming()
        big = b"{" + b"x" * (5 << 20)  # invalid JSON, 5 MB
        v9 = json.dumps({"schema_version": 9, "kind": "file.arrived"}).encode()
        site.declare()
        connection = pika.BlockingConnection(pika.URLParameters(amqp_url))
        channel = connection.channel()
        for message_id, body in (("big", big), ("v9", v9)):
            channel.basic_publish("", site.topology.queue("events"), body,
                                  pika.BasicProperties(message_id=message_id))  # fmt: skip
        connection.close()

        def listed() -> dict[str, Any]:
            response = httpx.get(f"{tm.url}/events/dead", headers=site.admin, timeout=10)
            return (
                {item["id"]: item for item in response.json()["items"]}
                if len(response.content)
                else {}
            )

        def both() -> dict[str, Any] | None:
            found = listed()
            return found if len(found) == 2 else None

        items = wait_until(both, 60, "two dead letters")
        assert len(httpx.get(f"{tm.url}/events/dead", headers=site.admin).content) < 10_000
        assert items["big"]["size"] == len(big) and len(items["big"]["preview"]) == 512
        assert "invalid JSON" in items["big"]["reason"]
        fetched = httpx.get(f"{tm.url}/events/dead/big/body", headers=site.admin, timeout=30)
        assert fetched.status_code == 200 and fetched.content == big
        missing = httpx.get(f"{tm.url}/events/dead/nothing/body", headers=site.admin)
        assert missing.status_code == 404

        first_death = items["v9"]["dead_at"]
        replayed = httpx.post(f"{tm.url}/events/dead/v9/replay", headers=site.admin, timeout=30)
        assert replayed.status_code == 200 and replayed.json()["replayed_at"]
        # It dies again at once, and is kept again (not dropped as a repeat).
        again = wait_until(lambda: (item := listed().get("v9")) and
                           item["dead_at"] != first_death and item, 30,
                           "v9 dead again")  # fmt: skip
        assert again["replayed_at"] is None and "schema version 9" in again["reason"]
