"""Transaction managers as real processes, without a whole cluster: for the event-engine
tests (claims, crash points, retries), which start, kill and restart TMs one by one.

A static coordinator (a few lines of HTTP, not the thing under test) hands every TM the
same assignment: consume the shared event queue. The TMs share a real database (SQLite file
or PostgreSQL), a data directory and a real broker under a per-test name prefix.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pika
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from ferrylink.cluster import WORK_DEAD_LETTERS, WORK_EVENTS, WORK_TRANSFER_LOG, Assignment
from ferrylink.contracts import FileArrived
from ferrylink.db import create_tables, make_engine
from ferrylink.messaging import Topology
from ferrylink.models import Account, ClusterState, Partner, ProcessedEvent, Route, Transfer
from ferrylink.passwords import hash_password
from tests.admin_support import admin_headers
from tests.helpers import wait_until

PASSWORD = "correct horse"
REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class StaticCoordinator:
    """Serves `/cluster/assignment`: every listed node consumes the shared event queue."""

    def __init__(self, nodes: list[str]) -> None:
        now = time.time()
        primary_work = [WORK_TRANSFER_LOG, WORK_DEAD_LETTERS]
        assignment = Assignment(
            epoch=1, mode="active_active", leader=nodes[0], primary=nodes[0],
            work={n: [WORK_EVENTS] + (primary_work if n == nodes[0] else []) for n in nodes},
            issued_at=now, not_before=0, expires_at=now + 86400,
        )  # fmt: skip
        body = assignment.model_dump_json().encode()
        self.assignment = assignment

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

            def do_GET(self) -> None:  # noqa: N802
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@dataclass
class Site:
    """What the TMs of one test share."""

    root: Path
    prefix: str
    amqp_url: str
    database_url: str
    coordinator: StaticCoordinator
    processes: list[TmProcess] = field(default_factory=list)
    # An administrator token's header for the TMs' APIs (made by `setup`).
    admin: dict[str, str] = field(default_factory=dict)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def home(self) -> Path:
        return self.data_dir / "homes" / "acme"

    @property
    def topology(self) -> Topology:
        return Topology(prefix=self.prefix, delivery_limit=100)

    def engine(self) -> Engine:
        return make_engine(self.database_url)

    def setup(self, routes: list[tuple[str, list[dict[str, Any]]]],
              partners: list[Partner] = ()) -> None:  # type: ignore[assignment]  # fmt: skip
        """The tables, account `acme` and its routes (pattern, steps), before any TM starts."""
        engine = self.engine()
        create_tables(engine)
        self.home.mkdir(parents=True, exist_ok=True)
        with Session(engine) as session:
            session.add(Account(name="acme", password_hash=hash_password(PASSWORD),
                                home="homes/acme"))  # fmt: skip
            for partner in partners:
                session.add(partner)
            for position, (pattern, steps) in enumerate(routes):
                session.add(Route(account="acme", pattern=pattern, position=position,
                                  steps_json=json.dumps(steps)))  # fmt: skip
            # Services start from the assignment in the shared database.
            assignment = self.coordinator.assignment
            session.merge(ClusterState(id=1, epoch=1, primary=assignment.primary,
                                       assignment_json=assignment.model_dump_json()))  # fmt: skip
            session.commit()
        self.admin = admin_headers(engine, "engine-tests")
        engine.dispose()

    def start_tm(self, node_id: str, fault: str | None = None, workers: int = 4,
                 claim_seconds: float = 3.0, **env: str) -> TmProcess:  # fmt: skip
        tm = TmProcess(self, node_id, fault, workers, claim_seconds, env)
        self.processes.append(tm)
        return tm.start()

    def declare(self) -> None:
        with _channel(self.amqp_url) as channel:
            self.topology.declare(channel)

    def publish(self, events: list[FileArrived], copies: int = 1) -> None:
        """Publish each event `copies` times back to back (confirmed)."""
        queue = self.topology.queue("events")
        with _channel(self.amqp_url) as channel:
            self.topology.declare(channel)  # a TM may not have connected yet
            channel.confirm_delivery()
            for event in events:
                for _ in range(copies):
                    channel.basic_publish("", queue, event.to_bytes(),
                                          pika.BasicProperties(message_id=event.id,
                                                               delivery_mode=2),
                                          mandatory=True)  # fmt: skip

    def queue_depth(self, name: str) -> int:
        with _channel(self.amqp_url) as channel:
            return int(channel.queue_declare(name, passive=True).method.message_count)

    def processed(self, ids: list[str]) -> int:
        engine = self.engine()
        try:
            with Session(engine) as session:
                rows = session.exec(select(ProcessedEvent.event_id)).all()
            return len(set(rows) & set(ids))
        finally:
            engine.dispose()

    def legs(self) -> list[Transfer]:
        engine = self.engine()
        try:
            with Session(engine) as session:
                return list(session.exec(select(Transfer)).all())
        finally:
            engine.dispose()

    def stop_all(self) -> None:
        for tm in self.processes:
            tm.kill()


class TmProcess:
    def __init__(self, site: Site, node_id: str, fault: str | None, workers: int,
                 claim_seconds: float, env: dict[str, str]) -> None:  # fmt: skip
        self.site = site
        self.node_id = node_id
        self.port = free_port()
        self.log_path = site.root / f"tm-{node_id}-{self.port}.log"
        self.env = {
            **os.environ,
            "FERRYLINK_NODE_ID": node_id,
            "FERRYLINK_AMQP_URL": site.amqp_url,
            "FERRYLINK_DATABASE_URL": site.database_url,
            "FERRYLINK_DATA_DIR": str(site.data_dir),
            "FERRYLINK_STATE_DIR": str(site.root / f"state-{node_id}"),
            "FERRYLINK_NAME_PREFIX": site.prefix,
            "FERRYLINK_HTTP_PORT": str(self.port),
            "FERRYLINK_COORDINATOR_URL": site.coordinator.url,
            "FERRYLINK_WORKERS": str(workers),
            "FERRYLINK_CLAIM_SECONDS": str(claim_seconds),
            "FERRYLINK_HEARTBEAT_INTERVAL": "5",
            "PYTHONPATH": f"{REPO}:{REPO / 'libs'}",
            **env,
        }
        self.env.pop("FERRYLINK_FAULT_POINT", None)
        if fault:
            self.env["FERRYLINK_FAULT_POINT"] = fault
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> TmProcess:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.transaction_manager.main"],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
            )  # fmt: skip
        return self

    def consuming(self) -> bool:
        try:
            work = httpx.get(f"{self.url}/work", headers=self.site.admin, timeout=2).json()
        except (httpx.HTTPError, ValueError):
            return False
        return WORK_EVENTS in work.get("active", [])

    def wait_consuming(self, timeout: float = 60) -> TmProcess:
        def ready() -> bool:
            if self.died() and "address already in use" in self.log_path.read_text():
                # The free port was taken before the TM bound it (seen in CI: a client
                # socket of another test got it from the same ephemeral range): again, on
                # another port.
                self.port = free_port()
                self.env["FERRYLINK_HTTP_PORT"] = str(self.port)
                self.log_path = self.site.root / f"tm-{self.node_id}-{self.port}.log"
                self.start()
            return self.consuming()

        wait_until(ready, timeout, f"TM {self.node_id} consuming ({self.log_path})")
        return self

    def died(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


@contextlib.contextmanager
def _channel(amqp_url: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(pika.URLParameters(amqp_url.split(",")[0]))
    try:
        yield connection.channel()
    finally:
        connection.close()


def upload(tm: TmProcess, name: str, content: bytes) -> dict[str, Any]:
    response = httpx.put(f"{tm.url}/files/acme/{name}", content=content,
                         auth=("acme", PASSWORD), timeout=30)  # fmt: skip
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def arrived(path: str, event_id: str | None = None) -> FileArrived:
    event = FileArrived(account="acme", path=path)
    if event_id:
        event.id = event_id
    return event


@contextlib.contextmanager
def running_site(root: Path, prefix: str, amqp_url: str, database_url: str,
                 nodes: list[str]) -> Iterator[Site]:  # fmt: skip
    """A site whose TM processes are all killed on exit."""
    coordinator = StaticCoordinator(nodes)
    site = Site(root, prefix, amqp_url, database_url, coordinator)
    try:
        yield site
    finally:
        site.stop_all()
        coordinator.stop()
