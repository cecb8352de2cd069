"""A whole Ferrylink cluster on one host, as plain OS processes (no Docker): `ferrylink up`.

Layout of a state directory (default `.ferrylink`)::

    STATE_DIR/
      ferrylink.db          the SQLite database every process of the cluster shares
      data/                 shared storage (FERRYLINK_DATA_DIR)
      servers               the servers list: `<id>\\t<coordinator API URL>` a line, in order
      cluster.json          what runs where (written by the supervisor, read by every command)
      supervisor.pid        pid of the running `ferrylink up` (foreground or detached)
      control/              requests to the supervisor (supervisor.py)
      logs/<server>-<service>.log, logs/supervisor.log
      broker/               a private RabbitMQ node, only when no broker answered
      env/<id>.env          optional: per-server (or per-edge) environment overrides

Database: the SQLite file above, unless `ferrylink up --database-url URL` names another
(e.g. a PostgreSQL database shared by every server).

Per-server environment overrides: `STATE_DIR/env/<id>.env` (`st2.env`, `edge1.env`), lines
`KEY=VALUE` (blank lines and `#` comments ignored), is read each time that server's
services are started and applied over what the runner sets. Fault tests use it to give one
server its own way to the broker and the database (`FERRYLINK_AMQP_URL`,
`FERRYLINK_DATABASE_URL` through TCP proxies they can cut): a network partition on loopback.

Processes. `ferrylink up` is the *supervisor*: it starts every backend service of every
server as its own child process (`python -m services.<name>.main`), each in its own
session (so a process group that can be signalled as a whole, and that a Ctrl-C on the
terminal does not reach), on port `base_port + 10 * server_index + service_index + 1`
(st1's coordinator is base_port + 1, st2's is base_port + 11, ...). It waits until every
service answers `/readyz` with 200, writes `cluster.json` and then only watches: it restarts
nothing by itself. On SIGINT, SIGTERM or SIGHUP it stops every child (SIGTERM to each
process group, a deadline, then SIGKILL) and the private broker, if it started one.

The rest of `ferrylink up` and friends:
- `processes.py`: the process helpers (pid alive, signal a group, wait, stop, log tail);
- `supervisor.py`: the supervisor (`ferrylink up`, foreground or detached) and its control
  channel (`ferrylink server stop|start|kill` asks it to act);
- `commands.py`: `down`, `server`, `status`, `failover`, `sync`, from a state directory;
- `demo.py`: the demo account a new user sends a first file with.
This module holds the cluster itself: its ports, its processes (`LocalCluster`, owned by
the supervisor) and the files of its state directory.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ferrylink.contracts import CLUSTER_MODES
from ferrylink.services_registry import (
    BACKEND_SERVICES,
    EDGE_SERVICE,
    module_name,
    service_environment,
)
from ferrylink.settings import DEFAULT_AMQP_URL, redact_url
from ferrylink_ops.admin_setup import ensure_first_admin
from ferrylink_ops.private_broker import (
    BrokerNode,
    is_broker_reachable,
    rabbitmq_installed,
    start_private_broker,
)
from ferrylink_ops.processes import (
    STOP_TIMEOUT,
    pid_alive,
    port_free,
    runs_ferrylink,
    signal_group,
    start_time,
    started_for,
    timestamp,
    write_json_atomic,
)

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = CLUSTER_MODES
DEFAULT_STATE_DIR = Path(".ferrylink")
DEFAULT_BASE_PORT = 8100
DEFAULT_PREFIX = "ferrylink"
HTTP_HOST = "127.0.0.1"
PORTS_PER_SERVER = 10
READY_TIMEOUT = 90.0
POLL_INTERVAL = 0.25
PROBE_TIMEOUT = 1.0
PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Server states in cluster.json.
UP = "up"
DOWN = "down"
DEGRADED = "degraded"  # some of its processes run, some do not


class ClusterError(Exception):
    """Something the operator must fix; the CLI prints the message and exits non-zero."""


def service_port(base_port: int, server_index: int, service_index: int) -> int:
    """Port of one service; indexes count from 0 (st1's coordinator is base_port + 1)."""
    return base_port + PORTS_PER_SERVER * server_index + service_index + 1


def server_ids(count: int) -> list[str]:
    return [f"st{i}" for i in range(1, count + 1)]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Broker
# --------------------------------------------------------------------------------------------


def broker_reachable(amqp_url: str, timeout: float = 2.0) -> bool:
    """True when any of the comma-separated broker URLs answers an AMQP handshake."""
    urls = [u.strip() for u in amqp_url.split(",") if u.strip()]
    return any(is_broker_reachable(url, timeout) for url in urls)


# --------------------------------------------------------------------------------------------
# The cluster
# --------------------------------------------------------------------------------------------


@dataclass
class ServiceProcess:
    """One service of one server: where it listens, its log and (while it runs) its process."""

    server_id: str
    service: str
    port: int
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    exit_code: int | None = None
    started_at: str = ""
    ready: bool = False  # its /readyz answered 200 when the supervisor last waited for it

    @property
    def pid(self) -> int | None:
        return self.popen.pid if self.popen is not None else None

    @property
    def running(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    @property
    def url(self) -> str:
        return f"http://{HTTP_HOST}:{self.port}"

    def to_json(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "port": self.port,
            "running": self.running,
            "ready": self.running and self.ready,
            "exit_code": self.exit_code,
            "started_at": self.started_at,
            "log": str(self.log_path),
        }


@dataclass
class EdgeProcess(ServiceProcess):
    """An edge proxy: its own API on `port`, partner SFTP and HTTPS ports, and the tunnel
    port the transaction managers dial out to."""

    sftp_port: int = 0
    https_port: int = 0
    tunnel_port: int = 0

    def to_json(self) -> dict[str, Any]:
        doc = super().to_json()
        doc.update(id=self.server_id, sftp_port=self.sftp_port, https_port=self.https_port,
                   tunnel_port=self.tunnel_port)  # fmt: skip
        return doc


def edge_ports(base_port: int, servers: int, edge_index: int) -> tuple[int, int, int, int]:
    """(API, SFTP, HTTPS, tunnel) ports of edge `edge_index` (from 0): the blocks of ten
    after the servers' (with 3 servers at base 8100, edge1 has 8131..8134)."""
    first = base_port + PORTS_PER_SERVER * (servers + edge_index) + 1
    return first, first + 1, first + 2, first + 3


# Base ports for clusters started by tests and benchmarks: below the private brokers' range
# (`private_broker.PORT_RANGE`, 20000-32000), so a broker node started elsewhere cannot take
# a port between the free-check and the supervisor's bind.
SPARE_BASE_PORT_RANGE = (10000, 20000)
_PORTS_TO_AVOID = frozenset({15672, 15674, 15675, 15692})  # RabbitMQ plugins' usual ports


def cluster_ports(base_port: int, servers: int, edges: int) -> list[int]:
    """Every port a cluster of `servers` servers and `edges` edges binds."""
    backend = [
        service_port(base_port, i, j) for i in range(servers) for j in range(len(BACKEND_SERVICES))
    ]
    return backend + [port for e in range(edges) for port in edge_ports(base_port, servers, e)]


def pick_free_base_port(
    servers: int, edges: int = 1, port_range: tuple[int, int] = SPARE_BASE_PORT_RANGE
) -> int:
    """A random base port in `port_range` whose whole cluster range is free now. Random, so
    concurrent runs on one machine rarely race for the same range."""
    low, high = port_range
    span = PORTS_PER_SERVER * (servers + edges) + 1
    for _ in range(200):
        base = random.randrange(low, high - span, 100)
        ports = cluster_ports(base, servers, edges)
        if not _PORTS_TO_AVOID.intersection(ports) and all(port_free(p) for p in ports):
            return base
    raise RuntimeError(f"no free range of {span} ports in {port_range}")


@dataclass
class Server:
    id: str
    index: int
    services: dict[str, ServiceProcess] = field(default_factory=dict)

    @property
    def api_url(self) -> str:
        """The server's API: its cluster coordinator's."""
        return self.services[BACKEND_SERVICES[0]].url

    @property
    def state(self) -> str:
        running = [p.running for p in self.services.values()]
        if all(running):
            return UP
        return DEGRADED if any(running) else DOWN


class LocalCluster:
    """N servers of the backend services as local processes, sharing one broker and SQLite.

    The object lives in the supervisor (`ferrylink up`); every process it starts is its
    child. Methods block until their action is done, polling with deadlines; `abort` (if
    given) is checked while waiting so Ctrl-C stays responsive.
    """

    def __init__(
        self,
        state_dir: Path,
        servers: int,
        mode: str,
        base_port: int = DEFAULT_BASE_PORT,
        prefix: str = DEFAULT_PREFIX,
        amqp_url: str | None = None,
        services: Sequence[str] = BACKEND_SERVICES,
        abort: Callable[[], bool] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        edges: int = 0,
        database_url: str | None = None,
    ) -> None:
        if mode not in MODES:
            raise ClusterError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        if servers < 1:
            raise ClusterError("a cluster needs at least one server")
        if len(services) >= PORTS_PER_SERVER:
            raise ClusterError(f"at most {PORTS_PER_SERVER - 1} services per server")
        if not PREFIX_PATTERN.match(prefix):
            raise ClusterError(f"bad name prefix {prefix!r}: letters, digits, '.', '_', '-'")
        last_port = max(service_port(base_port, servers - 1, len(services) - 1),
                        edge_ports(base_port, servers, edges - 1)[3] if edges else 0)  # fmt: skip
        if base_port < 1 or last_port > 65535:
            raise ClusterError(f"ports {base_port + 1}..{last_port} are out of range")
        self.state_dir = state_dir.resolve()
        self.mode = mode
        self.base_port = base_port
        self.prefix = prefix
        self.amqp_url = amqp_url or os.environ.get("FERRYLINK_AMQP_URL") or DEFAULT_AMQP_URL
        self.database_url = database_url or f"sqlite:///{self.state_dir / 'ferrylink.db'}"
        self.abort = abort or (lambda: False)
        self.sleep = sleep
        self.broker: BrokerNode | None = None
        self.status = "starting"
        self.servers: list[Server] = []
        for index, server_id in enumerate(server_ids(servers)):
            server = Server(server_id, index)
            for service_index, service in enumerate(services):
                server.services[service] = ServiceProcess(
                    server_id,
                    service,
                    service_port(base_port, index, service_index),
                    self.logs_dir / f"{server_id}-{service}.log",
                )
            self.servers.append(server)
        self.edges: list[EdgeProcess] = []
        for edge_index in range(edges):
            api, sftp, https, tunnel = edge_ports(base_port, servers, edge_index)
            edge_id = f"edge{edge_index + 1}"
            self.edges.append(
                EdgeProcess(edge_id, EDGE_SERVICE, api, self.logs_dir / f"{edge_id}.log",
                            sftp_port=sftp, https_port=https, tunnel_port=tunnel)
            )  # fmt: skip
        self.demo: dict[str, Any] = {}

    # ---- paths ------------------------------------------------------------------------------

    @property
    def logs_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def data_dir(self) -> Path:
        return self.state_dir / "data"

    @property
    def cluster_json(self) -> Path:
        return self.state_dir / "cluster.json"

    @property
    def servers_file(self) -> Path:
        return self.state_dir / "servers"

    def server(self, server_id: str) -> Server:
        for server in self.servers:
            if server.id == server_id:
                return server
        known = ", ".join(s.id for s in self.servers)
        raise ClusterError(f"unknown server {server_id!r}; this cluster has {known}")

    def processes(self, server_ids: Iterable[str] | None = None) -> list[ServiceProcess]:
        """The services of the servers (all, when None), and the edges named or all."""
        wanted = None if server_ids is None else set(server_ids)
        return [
            proc
            for server in self.servers
            if wanted is None or server.id in wanted
            for proc in server.services.values()
        ] + [edge for edge in self.edges if wanted is None or edge.server_id in wanted]

    @property
    def edge_keys_dir(self) -> Path:
        """SSH host key and TLS certificate, shared by every edge of the cluster."""
        return self.state_dir / "edge-keys"

    @property
    def edge_secret(self) -> str:
        """The secret the transaction managers present to the edges (made once)."""
        path = self.state_dir / "edge-secret"
        if not path.exists():
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as stream:
                stream.write(secrets.token_hex(24))
        return path.read_text().strip()

    # ---- preparing ----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Directories, free ports, a broker, the schema and the servers list."""
        for directory in (self.state_dir, self.logs_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
        busy = [p.port for p in self.processes() if not port_free(p.port)]
        busy += [
            port
            for edge in self.edges
            for port in (edge.sftp_port, edge.https_port, edge.tunnel_port)
            if not port_free(port)
        ]
        if busy:
            raise ClusterError(
                f"ports already in use: {', '.join(map(str, busy))}; pick another --base-port"
            )
        self.ensure_broker()
        self.create_schema()
        self.write_servers_file()
        ensure_first_admin(self.database_url, self.state_dir)

    def ensure_broker(self) -> None:
        """Use the configured broker; if none answers, start a private node if we can."""
        if broker_reachable(self.amqp_url):
            return
        shown = redact_url(self.amqp_url)
        if not rabbitmq_installed():
            raise ClusterError(
                f"no broker answers at {shown} and rabbitmq-server is not installed; "
                "start RabbitMQ or set FERRYLINK_AMQP_URL"
            )
        log.info("no broker answers at %s; starting a private RabbitMQ node", shown)
        self.broker = start_private_broker(self.state_dir / "broker")
        self.amqp_url = self.broker.url
        log.info("private broker at %s", redact_url(self.amqp_url))

    def create_schema(self) -> None:
        """Bring the database to this release's schema once here (create, or upgrade an
        older revision as `ferrylink db upgrade` does), so the services find it ready."""
        from ferrylink.db import make_engine
        from ferrylink.schema import SchemaError, upgrade_schema

        engine = make_engine(self.database_url)
        try:
            before, after = upgrade_schema(engine)
        except SchemaError as exc:
            raise ClusterError(str(exc)) from None
        finally:
            engine.dispose()
        if before.revision is not None and before.revision != after.revision:
            log.info("database schema upgraded from %s to %s", before.revision, after.revision)

    def write_servers_file(self) -> None:
        lines = "".join(f"{s.id}\t{s.api_url}\n" for s in self.servers)
        tmp = self.servers_file.with_name(".servers.tmp")
        tmp.write_text(lines)
        os.replace(tmp, self.servers_file)

    # ---- processes ---------------------------------------------------------------------------

    def env_overrides(self, server_id: str) -> dict[str, str]:
        """`STATE_DIR/env/<server_id>.env` as a dict (empty when there is no such file)."""
        path = self.state_dir / "env" / f"{server_id}.env"
        try:
            text = path.read_text()
        except FileNotFoundError:
            return {}
        overrides = {}
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            key = key.strip()
            if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
                raise ClusterError(f"{path}:{number}: expected KEY=VALUE, got {raw!r}")
            overrides[key] = value.strip()
        return overrides

    def environment(self, proc: ServiceProcess) -> dict[str, str]:
        env = self._base_environment(proc)
        env.update(self.env_overrides(proc.server_id))
        return env

    def _base_environment(self, proc: ServiceProcess) -> dict[str, str]:
        env = service_environment(dict(os.environ))
        if isinstance(proc, EdgeProcess):
            env.update(
                {
                    "FERRYLINK_EDGE_ID": proc.server_id,
                    "FERRYLINK_HTTP_HOST": HTTP_HOST,
                    "FERRYLINK_HTTP_PORT": str(proc.port),
                    "FERRYLINK_LISTEN_HOST": HTTP_HOST,
                    "FERRYLINK_SFTP_PORT": str(proc.sftp_port),
                    "FERRYLINK_HTTPS_PORT": str(proc.https_port),
                    "FERRYLINK_TUNNEL_HOST": HTTP_HOST,
                    "FERRYLINK_TUNNEL_PORT": str(proc.tunnel_port),
                    "FERRYLINK_EDGE_SECRET": self.edge_secret,
                    "FERRYLINK_EDGE_KEYS_DIR": str(self.edge_keys_dir),
                    "FERRYLINK_STATE_DIR": str(self.state_dir),
                    "PYTHONUNBUFFERED": "1",
                }
            )
            return env
        env.update(
            {
                # Transaction managers dial out to every edge (services/transaction_manager/
                # edge_link.py); the other services ignore these two.
                "FERRYLINK_EDGES": ",".join(f"{HTTP_HOST}:{e.tunnel_port}" for e in self.edges),
                "FERRYLINK_EDGE_SECRET": self.edge_secret,
                # Coordinators show the edges' backends and sessions in the web UI.
                "FERRYLINK_EDGE_ADMIN_URLS": ",".join(e.url for e in self.edges),
                "FERRYLINK_NODE_ID": proc.server_id,
                "FERRYLINK_HTTP_HOST": HTTP_HOST,
                "FERRYLINK_HTTP_PORT": str(proc.port),
                "FERRYLINK_AMQP_URL": self.amqp_url,
                "FERRYLINK_DATABASE_URL": self.database_url,
                "FERRYLINK_STATE_DIR": str(self.state_dir),
                "FERRYLINK_DATA_DIR": str(self.data_dir),
                "FERRYLINK_NAME_PREFIX": self.prefix,
                "FERRYLINK_CLUSTER_MODE": self.mode,
                # The coordinator seeds the database's servers list from it (first start only).
                "FERRYLINK_SERVERS_FILE": str(self.servers_file),
                # Services ask their own server's coordinator for the assignment at start.
                "FERRYLINK_COORDINATOR_URL": self.server(proc.server_id).api_url,
                "PYTHONUNBUFFERED": "1",
            }
        )
        return env

    def _spawn(self, proc: ServiceProcess) -> None:
        proc.log_path.parent.mkdir(parents=True, exist_ok=True)
        proc.started_at = timestamp()
        proc.exit_code = None
        proc.ready = False
        with open(proc.log_path, "ab") as log_file:
            log_file.write(
                f"--- {proc.started_at} ferrylink up: starting {proc.server_id} "
                f"{proc.service} on port {proc.port}\n".encode()
            )
            log_file.flush()
            proc.popen = subprocess.Popen(
                [sys.executable, "-m", module_name(proc.service) + ".main"],
                env=self.environment(proc),
                cwd=self.state_dir,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group; the terminal's Ctrl-C skips it
            )

    def spawn_server(self, server_id: str) -> list[ServiceProcess]:
        """Start the services of a server that are not running (coordinator first)."""
        started = []
        for proc in self.server(server_id).services.values():
            if proc.running:
                continue
            if not port_free(proc.port):
                raise ClusterError(f"{server_id} {proc.service}: port {proc.port} is in use")
            self._spawn(proc)
            started.append(proc)
        return started

    def spawn_all(self) -> None:
        for server in self.servers:
            self.spawn_server(server.id)
        for edge in self.edges:
            if not edge.running:
                if not port_free(edge.port):
                    raise ClusterError(f"{edge.server_id}: port {edge.port} is in use")
                self._spawn(edge)

    def reap(self) -> list[ServiceProcess]:
        """Notice processes that exited on their own; returns them (they are not restarted)."""
        exited = []
        for proc in self.processes():
            if proc.popen is not None and proc.exit_code is None:
                code = proc.popen.poll()
                if code is not None:
                    proc.exit_code = code
                    exited.append(proc)
        return exited

    def _wait_exit(self, procs: Sequence[ServiceProcess], deadline: float) -> list[ServiceProcess]:
        """Reap each process before `deadline`; returns the ones still running."""
        left = []
        for proc in procs:
            assert proc.popen is not None
            try:
                proc.exit_code = proc.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                left.append(proc)
        return left

    def stop_servers(
        self, server_ids: Iterable[str] | None = None, timeout: float = STOP_TIMEOUT
    ) -> None:
        """SIGTERM every process of the servers at once, wait, then SIGKILL what is left."""
        procs = [p for p in self.processes(server_ids) if p.running]
        for proc in procs:
            assert proc.pid is not None
            signal_group(proc.pid, signal.SIGTERM)
        left = self._wait_exit(procs, time.monotonic() + timeout)
        for proc in left:
            assert proc.pid is not None
            log.warning(
                "%s %s did not stop in %.0f s: SIGKILL", proc.server_id, proc.service, timeout
            )
            signal_group(proc.pid, signal.SIGKILL)
        self._wait_exit(left, time.monotonic() + 30.0)

    def kill_server(self, server_id: str) -> None:
        """SIGKILL every process of a server (a failover drill) and reap them."""
        procs = [p for p in self.server(server_id).services.values() if p.running]
        for proc in procs:
            assert proc.pid is not None
            signal_group(proc.pid, signal.SIGKILL)
        self._wait_exit(procs, time.monotonic() + 30.0)

    def start_server(self, server_id: str, timeout: float = READY_TIMEOUT) -> dict[str, bool]:
        """Start a server's services again (same ports and environment) and wait for ready."""
        self.spawn_server(server_id)
        return {
            service: ready
            for (_sid, service), ready in self.wait_ready([server_id], timeout).items()
        }

    # ---- readiness ----------------------------------------------------------------------------

    def wait_ready(
        self, server_ids: Iterable[str] | None = None, timeout: float = READY_TIMEOUT
    ) -> dict[tuple[str, str], bool]:
        """Poll `/readyz` of the servers' services until all answer 200, one of them exits,
        `timeout` passes, or `abort()` says so. Returns readiness per (server, service)."""
        procs = self.processes(server_ids)
        ready = {(p.server_id, p.service): False for p in procs}
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=PROBE_TIMEOUT) as client:
            while True:
                for proc in procs:
                    key = (proc.server_id, proc.service)
                    if not ready[key] and proc.running:
                        ready[key] = proc.ready = probe_ready(client, proc.url)
                if all(ready.values()):
                    return ready
                exited = [p for p in procs if not p.running]
                if exited or self.abort() or time.monotonic() >= deadline:
                    for proc in exited:
                        ready[(proc.server_id, proc.service)] = False
                    return ready
                self.sleep(POLL_INTERVAL)

    # ---- cluster.json -------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "mode": self.mode,
            "amqp_url": ",".join(redact_url(u.strip()) for u in self.amqp_url.split(",")),
            "database_url": self.database_url,
            "servers": [
                {
                    "id": server.id,
                    "state": server.state,
                    "api_url": server.api_url,
                    "services": {name: p.to_json() for name, p in server.services.items()},
                }
                for server in self.servers
            ],
            "edges": [edge.to_json() for edge in self.edges],
            "demo": self.demo,
            "status": self.status,
            "supervisor_pid": os.getpid(),
            "prefix": self.prefix,
            "base_port": self.base_port,
            "state_dir": str(self.state_dir),
            "updated_at": timestamp(),
        }
        if self.broker is not None:
            # BrokerNode.beam_pid: the node's Erlang VM (`pid` for other broker handles).
            doc["broker_pid"] = getattr(self.broker, "beam_pid", None) or getattr(
                self.broker, "pid", None
            )
            doc["broker_url"] = redact_url(self.broker.url)
        return doc

    def write_cluster_json(self) -> None:
        write_json_atomic(self.cluster_json, self.to_json())

    def rows(self, ready: dict[tuple[str, str], bool] | None = None) -> list[list[Any]]:
        ready = ready or {}
        return [
            [
                p.server_id,
                p.service,
                p.pid if p.running else "-",
                p.port,
                "yes" if ready.get((p.server_id, p.service)) else "no",
            ]
            for p in self.processes()
        ]

    # ---- the end ------------------------------------------------------------------------------

    def shutdown(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every service process, then the private broker; nothing is left behind."""
        self.stop_servers(None, timeout)
        if self.broker is not None:
            try:
                self.broker.stop()
            except Exception:
                log.exception("private broker did not stop cleanly; killing it")
                with contextlib.suppress(Exception):
                    self.broker.kill()


def probe_ready(client: httpx.Client, base_url: str) -> bool:
    try:
        return client.get(f"{base_url}/readyz").status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------------------------
# The files of a state directory, as every command reads them
# --------------------------------------------------------------------------------------------


def control_dir(state_dir: Path) -> Path:
    """Where the CLI leaves requests for the supervisor (supervisor.py)."""
    return state_dir / "control"


def supervisor_pid_file(state_dir: Path) -> Path:
    return state_dir / "supervisor.pid"


def read_cluster_json(state_dir: Path) -> dict[str, Any]:
    path = state_dir / "cluster.json"
    try:
        doc: dict[str, Any] = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ClusterError(
            f"no cluster in {state_dir} ({path.name} is missing); start one with `ferrylink up`"
        ) from exc
    except ValueError as exc:
        raise ClusterError(f"{path} is not valid JSON: {exc}") from exc
    return doc


def write_supervisor_pid(state_dir: Path) -> None:
    """This process is the state directory's supervisor: its pid, and its start time, which
    tells it from a later process given the same pid."""
    pid = os.getpid()
    supervisor_pid_file(state_dir).write_text(f"{pid}\n{start_time(pid) or ''}\n")


def running_supervisor(state_dir: Path) -> int | None:
    """The pid of the live `ferrylink up` of this state directory, if any."""
    try:
        lines = supervisor_pid_file(state_dir).read_text().split("\n")
        pid = int(lines[0])
        started = int(lines[1]) if len(lines) > 1 and lines[1].strip() else None
    except (OSError, ValueError):
        return None
    if not pid_alive(pid):
        return None
    if started is not None and start_time(pid) is not None:
        return pid if start_time(pid) == started else None
    return pid if runs_ferrylink(pid) else None  # a file from before start times


def runs_for(state_dir: Path, pid: int | None) -> bool:
    """Whether a pid recorded in cluster.json still runs a process this cluster started (not
    a process of another cluster, or anything else, that was given the pid since)."""
    if not pid:
        return False
    return pid_alive(pid) and started_for(pid, "FERRYLINK_STATE_DIR", state_dir)


def cluster_processes(state_dir: Path, doc: dict[str, Any]) -> list[int]:
    """The recorded pids of services and edges that still run for this cluster."""
    return [pid for pid in cluster_pids(doc) if runs_for(state_dir, pid)]


def cluster_pids(doc: dict[str, Any]) -> list[int]:
    """Pids in cluster.json of service processes recorded as running."""
    return [
        int(svc["pid"])
        for server in doc.get("servers", [])
        for svc in server.get("services", {}).values()
        if svc.get("pid") and svc.get("running", True)
    ] + [
        int(edge["pid"])
        for edge in doc.get("edges", [])
        if edge.get("pid") and edge.get("running", True)
    ]


def check_no_cluster_running(state_dir: Path) -> None:
    """Refuse to start a second cluster in a state directory whose processes still run."""
    pid = running_supervisor(state_dir)
    if pid is not None and pid != os.getpid():
        raise ClusterError(
            f"a cluster already runs from {state_dir} (supervisor pid {pid}); "
            "stop it with `ferrylink down` first"
        )
    if (state_dir / "cluster.json").exists():
        with contextlib.suppress(ClusterError):
            left = cluster_processes(state_dir, read_cluster_json(state_dir))
            if left:
                raise ClusterError(
                    f"processes of an earlier cluster still run from {state_dir} "
                    f"(pids {', '.join(map(str, left))}); stop them with `ferrylink down`"
                )


def placement_table(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """What runs where, from cluster.json alone (no probes)."""
    rows = [
        [
            server["id"],
            name,
            svc.get("pid") if svc.get("running") else "-",
            svc.get("port"),
            "yes" if svc.get("ready") else "no",
        ]
        for server in doc.get("servers", [])
        for name, svc in server.get("services", {}).items()
    ] + [
        [
            edge["id"],
            EDGE_SERVICE,
            edge.get("pid") if edge.get("running") else "-",
            f"{edge.get('port')} (sftp {edge.get('sftp_port')}, https {edge.get('https_port')})",
            "yes" if edge.get("ready") else "no",
        ]
        for edge in doc.get("edges", [])
    ]
    return ["server", "service", "pid", "port", "ready"], rows
