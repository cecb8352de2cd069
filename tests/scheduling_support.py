"""Shared pieces of the folder-monitor, scheduler and scheduled-transfer tests: a real event
queue to publish to and read back, a SQLite database of their own, and the shared data
directory of a local cluster."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika
from sqlalchemy.engine import Engine
from sqlmodel import Session

from ferrylink.contracts import EVENT, Event, FileArrived
from ferrylink.db import make_engine
from ferrylink.messaging import Publisher, Topology
from ferrylink.models import Account, Partner
from tests.cluster_support import Cluster


@dataclass
class EventQueue:
    """The cluster's event queue on the test broker: publish to it, read everything back."""

    amqp_url: str
    topology: Topology
    publisher: Publisher
    published: list[tuple[float, Event]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def name(self) -> str:
        return self.topology.queue("events")

    def publish_batch(self, events: Sequence[Event]) -> None:
        """What the services do: publish all, then wait for every confirm."""
        futures = [
            self.publisher.publish("", self.name, e.to_bytes(), message_id=e.id) for e in events
        ]
        for future in futures:
            future.result(30)
        with self.lock:
            self.published.extend((time.monotonic(), e) for e in events)

    def publish(self, event: Event) -> None:
        self.publish_batch([event])

    def drain(self) -> list[Event]:
        """Every message now on the queue, removed from it, in order."""
        connection = pika.BlockingConnection(pika.URLParameters(self.amqp_url.split(",")[0]))
        events: list[Event] = []
        try:
            channel = connection.channel()
            while True:
                method, _props, body = channel.basic_get(self.name, auto_ack=True)
                if method is None:
                    return events
                events.append(EVENT.validate_json(body))
        finally:
            connection.close()

    @property
    def published_arrivals(self) -> list[tuple[float, FileArrived]]:
        with self.lock:
            return [(at, e) for at, e in self.published if isinstance(e, FileArrived)]

    def drain_arrivals(self) -> list[FileArrived]:
        """`drain()`, for a queue that holds only file.arrived events."""
        events = self.drain()
        arrivals = [e for e in events if isinstance(e, FileArrived)]
        assert len(arrivals) == len(events), events
        return arrivals


def add_account(engine: Engine, data_dir: Path, name: str = "acme") -> Path:
    """An account whose home is data/homes/<name>; returns the home."""
    with Session(engine) as session:
        session.add(Account(name=name, home=f"homes/{name}", password_hash="x"))
        session.commit()
    home = data_dir / "homes" / name
    home.mkdir(parents=True, exist_ok=True)
    return home


def add_partner(engine: Engine, name: str = "bank", **fields: Any) -> None:
    values: dict[str, Any] = {"protocol": "sftp", "host": "127.0.0.1", "port": 1,
                              "username": "partner", "password": "secret",
                              "check_host_key": False}  # fmt: skip
    values.update(fields)
    with Session(engine) as session:
        session.add(Partner(name=name, **values))
        session.commit()


# --------------------------------------------------------------------------------------------
# Local clusters
# --------------------------------------------------------------------------------------------


def cluster_engine(cluster: Cluster) -> Engine:
    """The cluster's own database (the SQLite file every process of it shares)."""
    return make_engine(f"sqlite:///{cluster.state_dir / 'ferrylink.db'}")


def cluster_data_dir(cluster: Cluster) -> Path:
    return cluster.state_dir / "data"


def api(cluster: Cluster, server: str, service: str) -> str:
    return f"http://127.0.0.1:{cluster.port(server, service)}"


def post(cluster: Cluster, url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = cluster.http.post(url, json=body, timeout=10)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result
