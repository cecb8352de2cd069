"""What the chaos suite runs on, started and stopped as one: a private 3-node RabbitMQ
cluster, a throwaway PostgreSQL database, per-server TCP proxies (the network a test can
cut), a 3-server Ferrylink local cluster with one edge, an HTTP partner and a tracking
receiver. Everything is stopped by `close()`, also after a failure half way through."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg2

from ferrylink.services_registry import BACKEND_SERVICES
from ferrylink_ops.local_cluster import edge_ports
from ferrylink_ops.private_broker import BrokerNode, start_broker_cluster, stop_all
from ferrylink_ops.tracking_sink import TrackingSink
from tests.cluster_support import (
    BOOT_TIMEOUT,
    Cluster,
    ferrylink,
    free_base_port,
    kill_leftovers,
)
from tests.http_sink import HttpSink
from tests.tcp_proxy import TcpProxy

SERVERS = ["st1", "st2", "st3"]
PARTNER = "sink"
TRACKER = "tracker"
POSTGRES_DSN = os.environ.get("FERRYLINK_TEST_POSTGRES_DSN", "host=127.0.0.1 user=postgres")


@contextlib.contextmanager
def throwaway_postgres(admin_dsn: str = POSTGRES_DSN) -> Iterator[tuple[str, str]]:
    """A fresh database on the local PostgreSQL: (SQLAlchemy URL, libpq DSN); dropped after."""
    name = f"ferrylink_chaos_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(admin_dsn + " dbname=postgres")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        params = dict(p.split("=", 1) for p in admin_dsn.split())
        user, host = params.get("user", "postgres"), params.get("host", "127.0.0.1")
        yield f"postgresql+psycopg2://{user}@{host}/{name}", f"{admin_dsn} dbname={name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@dataclass
class ServerLinks:
    """One server's way to the brokers, the database and the edge: TCP proxies. Cutting them
    all is that server falling off the network (its HTTP APIs stay reachable, so the test
    can still watch what it does; the shared file storage stays too, as an NFS mount would)."""

    server: str
    brokers: list[TcpProxy]
    database: TcpProxy
    edge: TcpProxy
    cut_now: bool = False

    @property
    def proxies(self) -> list[TcpProxy]:
        return [*self.brokers, self.database, self.edge]

    def cut(self) -> None:
        for proxy in self.proxies:
            proxy.cut()
        self.cut_now = True

    def heal(self) -> None:
        for proxy in self.proxies:
            proxy.restore()
        self.cut_now = False

    def env_file(self, database_url: str) -> str:
        """STATE_DIR/env/<server>.env: this server reaches everything through its proxies."""
        amqp = ",".join(f"amqp://guest:guest@127.0.0.1:{p.port}/%2F" for p in self.brokers)
        host_db = database_url.replace("@127.0.0.1/", f"@127.0.0.1:{self.database.port}/")
        return (
            f"# chaos suite: {self.server} through cuttable proxies\n"
            f"FERRYLINK_AMQP_URL={amqp}\nFERRYLINK_DATABASE_URL={host_db}\n"
            f"FERRYLINK_EDGES=127.0.0.1:{self.edge.port}\n"
        )


@dataclass
class World:
    workdir: Path
    mode: str
    brokers: list[BrokerNode] = field(default_factory=list)
    links: dict[str, ServerLinks] = field(default_factory=dict)
    cluster: Cluster | None = None
    sink: HttpSink | None = None
    tracker: TrackingSink | None = None
    database_url: str = ""
    dsn: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    _stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    # ---- start -------------------------------------------------------------------------

    def start(self) -> World:
        started = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.brokers = start_broker_cluster(self.workdir / "broker", size=3)
        self._stack.callback(stop_all, self.brokers)
        self.timings["brokers_s"] = time.monotonic() - started
        self.database_url, self.dsn = self._stack.enter_context(throwaway_postgres())
        self.sink = HttpSink(self.workdir / "partner").start()
        self._stack.callback(self.sink.stop)
        self.tracker = TrackingSink()
        self._stack.callback(self.tracker.stop)

        base_port = free_base_port(len(SERVERS))
        tunnel_port = edge_ports(base_port, len(SERVERS), 0)[3]
        state_dir = self.workdir / "state"
        (state_dir / "env").mkdir(parents=True, exist_ok=True)
        for server in SERVERS:
            links = ServerLinks(
                server,
                [TcpProxy("127.0.0.1", node.amqp_port).start() for node in self.brokers],
                TcpProxy("127.0.0.1", 5432).start(),
                TcpProxy("127.0.0.1", tunnel_port).start(),
            )
            for proxy in links.proxies:
                self._stack.callback(proxy.cut)
            self.links[server] = links
            (state_dir / "env" / f"{server}.env").write_text(links.env_file(self.database_url))

        prefix = f"chaos-{uuid.uuid4().hex[:8]}"
        amqp = ",".join(node.url for node in self.brokers)
        self._stack.callback(self._stop_cluster, state_dir)
        began = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "ferrylink_ops.cli", "up", "--servers", str(len(SERVERS)),
             "--mode", self.mode, "--state-dir", str(state_dir), "--base-port", str(base_port),
             "--prefix", prefix, "--edges", "1", "--database-url", self.database_url,
             "--detach"],
            env=dict(os.environ, FERRYLINK_AMQP_URL=amqp,
                     # the HTTP partner listens on loopback, which partners may not use
                     FERRYLINK_PARTNER_ALLOW="127.0.0.1"),
            capture_output=True, text=True, timeout=BOOT_TIMEOUT + 60, check=False,
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"ferrylink up failed:\n{result.stdout}\n{result.stderr}")
        self.cluster = Cluster(state_dir, prefix, amqp)
        self.timings["cluster_up_s"] = time.monotonic() - began
        self._configure()
        self.timings["setup_s"] = time.monotonic() - started
        return self

    def _configure(self) -> None:
        """Route every demo upload to the HTTP partner (and a copy to `archive`); the
        tracking receiver as a sentinel-link endpoint."""
        cluster = self.cluster
        assert cluster is not None and self.sink is not None and self.tracker is not None
        tm = self.url("st2", "transaction-manager")  # configured on a secondary on purpose
        partner = {"name": PARTNER, "protocol": "http", "url": self.sink.url}
        _expect(cluster.http.post(f"{tm}/partners", json=partner), 201)
        for route in cluster.http.get(f"{tm}/routes", params={"account": "demo"}).json()["items"]:
            _expect(cluster.http.delete(f"{tm}/routes/{route['id']}"), 204)
        steps = [{"kind": "copy", "folder": "archive"}, {"kind": "push", "partner": PARTNER}]
        route = {"account": "demo", "pattern": "*", "steps": steps}
        _expect(cluster.http.post(f"{tm}/routes", json=route), 201)
        endpoint = {"name": TRACKER, "url": self.tracker.url}
        _expect(cluster.http.post(f"{self.url('st2', 'sentinel-link')}/endpoints", json=endpoint),
                201)  # fmt: skip

    # ---- helpers -----------------------------------------------------------------------

    def url(self, server: str, service: str) -> str:
        assert self.cluster is not None
        return f"http://127.0.0.1:{self.cluster.port(server, service)}"

    def ports(self) -> list[int]:
        """Every backend service's and the edge's API port."""
        assert self.cluster is not None
        doc = self.cluster.doc()
        return [
            server["services"][name]["port"]
            for server in doc["servers"]
            for name in BACKEND_SERVICES
        ] + [edge["port"] for edge in doc["edges"]]

    def pid(self, server: str, service: str) -> int:
        assert self.cluster is not None
        for entry in self.cluster.doc()["servers"]:
            if entry["id"] == server:
                return int(entry["services"][service]["pid"])
        raise KeyError(server)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        """Read the shared database directly (not through any server's proxy)."""
        with (
            contextlib.closing(psycopg2.connect(self.dsn)) as connection,
            connection.cursor() as cursor,
        ):
            cursor.execute(sql, params)
            return list(cursor.fetchall())

    # ---- stop --------------------------------------------------------------------------

    def _stop_cluster(self, state_dir: Path) -> None:
        for links in self.links.values():
            if links.cut_now:
                with contextlib.suppress(OSError):
                    links.heal()  # a clean `down` needs the broker and database reachable
        if self.cluster is not None:
            self.cluster.http.close()
        ferrylink("down", "--state-dir", str(state_dir), timeout=120)
        kill_leftovers(state_dir)

    def close(self) -> None:
        self._stack.close()


def _expect(response: httpx.Response, status: int) -> None:
    if response.status_code != status:
        raise RuntimeError(
            f"{response.request.method} {response.request.url}: {response.status_code} "
            f"{response.text}"
        )
