"""A whole Ferrylink cluster on one host, as plain OS processes (no Docker): `ferrylink up`.

Layout of a state directory (default `.ferrylink`)::

    STATE_DIR/
      ferrylink.db          the SQLite database every process of the cluster shares
      data/                 shared storage (FERRYLINK_DATA_DIR)
      servers               the servers list: `<id>\\t<coordinator API URL>` a line, in order
      cluster.json          what runs where (written by the supervisor, read by every command)
      supervisor.pid        pid of the running `ferrylink up` (foreground or detached)
      control/              requests to the supervisor (see below)
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
server as its own child process (`python -m ferrylink_ops.cli service NAME`), each in its own
session (so a process group that can be signalled as a whole, and that a Ctrl-C on the
terminal does not reach), on port `base_port + 10 * server_index + service_index + 1`
(st1's coordinator is base_port + 1, st2's is base_port + 11, ...). It waits until every
service answers `/readyz` with 200, writes `cluster.json` and then only watches: it restarts
nothing by itself. On SIGINT, SIGTERM or SIGHUP it stops every child (SIGTERM to each
process group, a deadline, then SIGKILL) and the private broker, if it started one.

Acting on one server (`ferrylink server stop|start|kill ID`) goes *through the supervisor*,
so that every service process stays a child of one owner, which reaps it, is the only writer
of `cluster.json`, and stops everything on `down` or Ctrl-C. The channel is a directory:

1. the CLI writes `control/<time_ns>-<uuid>.req` (JSON `{"id", "action", "server"}`,
   written to a temporary name and renamed, so the supervisor never reads half a request),
2. sends SIGUSR1 to the supervisor to wake it up (it also looks every half second),
3. the supervisor handles the requests in name order on its main thread (no locks needed)
   and writes `control/<uuid>.resp` (JSON `{"ok", "message"}`) the same way, after the
   action is complete (processes gone, or a started server ready) and `cluster.json` has
   been rewritten,
4. the CLI polls for the response with a deadline, and gives up early if the supervisor
   dies.

When no supervisor is running (it was SIGKILLed, say), `server stop|kill` and `down` act on
the pids in `cluster.json` directly (after checking that each pid still runs a Ferrylink
command, against pid reuse); `server start` then needs a new `ferrylink up`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import re
import secrets
import select
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import httpx

from ferrylink.contracts import CLUSTER_MODES
from ferrylink.services_registry import BACKEND_SERVICES, EDGE_SERVICE, module_name
from ferrylink.settings import DEFAULT_AMQP_URL, redact_url
from ferrylink_ops.admin_setup import auth_headers, ensure_first_admin
from ferrylink_ops.private_broker import (
    BrokerNode,
    is_broker_reachable,
    rabbitmq_installed,
    start_private_broker,
)

log = logging.getLogger(__name__)

MODES: tuple[str, ...] = CLUSTER_MODES
DEFAULT_STATE_DIR = Path(".ferrylink")
DEFAULT_BASE_PORT = 8100
DEFAULT_PREFIX = "ferrylink"
HTTP_HOST = "127.0.0.1"
PORTS_PER_SERVER = 10
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 20.0
POLL_INTERVAL = 0.25
PROBE_TIMEOUT = 1.0
PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Server states in cluster.json.
UP = "up"
DOWN = "down"
DEGRADED = "degraded"  # some of its processes run, some do not


class ClusterError(Exception):
    """Something the operator must fix; the CLI prints the message and exits non-zero."""


# --------------------------------------------------------------------------------------------
# Small process helpers (also used by the tests)
# --------------------------------------------------------------------------------------------


def pid_alive(pid: int | None) -> bool:
    """True while `pid` is a running (not zombie) process."""
    if not pid or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    # The state letter follows the parenthesised command name, which may contain spaces.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _cmdline(pid: int) -> str:
    try:
        return (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        )
    except OSError:
        return ""


def _runs_ferrylink(pid: int, markers: Sequence[str] = ("ferrylink", "services.")) -> bool:
    """Guard against pid reuse before signalling a pid read from a file."""
    if not Path("/proc").is_dir():
        return True
    cmdline = _cmdline(pid)
    return any(marker in cmdline for marker in markers)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the process group led by `pid` (our children lead their own), else the pid."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def wait_pids_gone(pids: Iterable[int], timeout: float) -> list[int]:
    """Poll until none of `pids` runs or `timeout` passes; returns those still running."""
    deadline = time.monotonic() + timeout
    remaining = [p for p in pids if pid_alive(p)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [p for p in remaining if pid_alive(p)]
    return remaining


def terminate_pids(pids: Sequence[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM each pid's process group, wait until `timeout`, SIGKILL what is left, wait."""
    for pid in pids:
        _signal_group(pid, signal.SIGTERM)
    left = wait_pids_gone(pids, timeout)
    for pid in left:
        _signal_group(pid, signal.SIGKILL)
    wait_pids_gone(left, 10.0)


def port_free(port: int, host: str = HTTP_HOST) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def service_port(base_port: int, server_index: int, service_index: int) -> int:
    """Port of one service; indexes count from 0 (st1's coordinator is base_port + 1)."""
    return base_port + PORTS_PER_SERVER * server_index + service_index + 1


def server_ids(count: int) -> list[str]:
    return [f"st{i}" for i in range(1, count + 1)]


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def log_tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


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
        env = dict(os.environ)
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
        proc.started_at = _now()
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
            _signal_group(proc.pid, signal.SIGTERM)
        left = self._wait_exit(procs, time.monotonic() + timeout)
        for proc in left:
            assert proc.pid is not None
            log.warning(
                "%s %s did not stop in %.0f s: SIGKILL", proc.server_id, proc.service, timeout
            )
            _signal_group(proc.pid, signal.SIGKILL)
        self._wait_exit(left, time.monotonic() + 30.0)

    def kill_server(self, server_id: str) -> None:
        """SIGKILL every process of a server (a failover drill) and reap them."""
        procs = [p for p in self.server(server_id).services.values() if p.running]
        for proc in procs:
            assert proc.pid is not None
            _signal_group(proc.pid, signal.SIGKILL)
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
            "updated_at": _now(),
        }
        if self.broker is not None:
            # BrokerNode.beam_pid: the node's Erlang VM (`pid` for other broker handles).
            doc["broker_pid"] = getattr(self.broker, "beam_pid", None) or getattr(
                self.broker, "pid", None
            )
            doc["broker_url"] = redact_url(self.broker.url)
        return doc

    def write_cluster_json(self) -> None:
        _write_json_atomic(self.cluster_json, self.to_json())

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
# The supervisor: `ferrylink up` in the foreground (or detached)
# --------------------------------------------------------------------------------------------


class _Waker:
    """Sleep until a timeout or until a signal arrives (self-pipe via set_wakeup_fd)."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        self._previous = signal.set_wakeup_fd(self._write, warn_on_full_buffer=False)

    def wait(self, timeout: float) -> None:
        select.select([self._read], [], [], max(0.0, timeout))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 512):
                pass

    def close(self) -> None:
        signal.set_wakeup_fd(self._previous)
        os.close(self._read)
        os.close(self._write)


def control_dir(state_dir: Path) -> Path:
    return state_dir / "control"


def supervisor_pid_file(state_dir: Path) -> Path:
    return state_dir / "supervisor.pid"


class Supervisor:
    """Runs a `LocalCluster` until a signal: start, wait ready, serve control requests."""

    def __init__(
        self,
        cluster: LocalCluster,
        ready_timeout: float = READY_TIMEOUT,
        out: Callable[[str], None] = print,
    ) -> None:
        self.cluster = cluster
        self.ready_timeout = ready_timeout
        self.out = out
        self.stop_signal: int | None = None
        self.waker: _Waker | None = None
        cluster.abort = lambda: self.stop_signal is not None
        cluster.sleep = self._sleep

    def _sleep(self, seconds: float) -> None:
        if self.waker is not None:
            self.waker.wait(seconds)
        else:
            time.sleep(seconds)

    def _on_stop_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stop_signal is None:
            self.stop_signal = signum

    def _install_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_stop_signal)
        # SIGUSR1 only wakes the loop (the wakeup fd does that); the handler does nothing.
        signal.signal(signal.SIGUSR1, lambda _s, _f: None)
        self.waker = _Waker()

    def run(self) -> int:
        """The whole life of `ferrylink up`; returns the process exit code."""
        cluster = self.cluster
        state_dir = cluster.state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        check_no_cluster_running(state_dir)
        pid_file = supervisor_pid_file(state_dir)
        pid_file.write_text(f"{os.getpid()}\n")
        controls = control_dir(state_dir)
        controls.mkdir(exist_ok=True)
        for stale in controls.iterdir():
            stale.unlink(missing_ok=True)
        self._install_signals()
        code = 1
        try:
            cluster.prepare()
            if self.stop_signal is None:
                cluster.spawn_all()
                cluster.write_cluster_json()
                ready = cluster.wait_ready(None, self.ready_timeout)
                cluster.reap()
                self.out(
                    format_table(("server", "service", "pid", "port", "ready"), cluster.rows(ready))
                )
                if self.stop_signal is not None:
                    code = 128 + self.stop_signal
                elif not all(ready.values()):
                    self._report_not_ready(ready)
                    code = 1
                else:
                    if cluster.edges:
                        try:
                            cluster.demo = create_demo(cluster)
                        except (ClusterError, httpx.HTTPError, OSError) as exc:
                            self.out(f"warning: could not create the demo account: {exc}")
                    cluster.status = "running"
                    cluster.write_cluster_json()
                    self.out(
                        f"cluster up: {len(cluster.servers)} servers, mode {cluster.mode}, "
                        f"broker {redact_url(cluster.amqp_url)}, state {state_dir}"
                    )
                    for line in demo_lines(cluster.demo):
                        self.out(line)
                    self.out("stop with Ctrl-C, SIGTERM or `ferrylink down`")
                    self._watch()
                    code = 0
        except ClusterError as exc:
            self.out(f"error: {exc}")
            code = 1
        finally:
            self._shutdown()
            with contextlib.suppress(OSError):
                if pid_file.read_text().strip() == str(os.getpid()):
                    pid_file.unlink()
            if self.waker is not None:
                self.waker.close()
        return code

    def _report_not_ready(self, ready: dict[tuple[str, str], bool]) -> None:
        for (server_id, service), ok in ready.items():
            if ok:
                continue
            edges = {edge.server_id: edge for edge in self.cluster.edges}
            proc = edges.get(server_id) or self.cluster.server(server_id).services[service]
            why = f"exited with {proc.exit_code}" if proc.exit_code is not None else "not ready"
            self.out(f"{server_id} {service}: {why}; last lines of {proc.log_path}:")
            self.out(log_tail(proc.log_path) or "(empty)")
        self.out(f"error: the cluster did not become ready within {self.ready_timeout:.0f} s")

    def _watch(self) -> None:
        """Until a stop signal: note processes that die, and serve control requests."""
        assert self.waker is not None
        while self.stop_signal is None:
            self.waker.wait(0.5)
            changed = False
            for proc in self.cluster.reap():
                log.warning(
                    "%s %s exited with code %s (not restarted)",
                    proc.server_id,
                    proc.service,
                    proc.exit_code,
                )
                self.out(f"{proc.server_id} {proc.service} exited with code {proc.exit_code}")
                changed = True
            changed = self._serve_requests() or changed
            if changed:
                self.cluster.write_cluster_json()

    def _serve_requests(self) -> bool:
        controls = control_dir(self.cluster.state_dir)
        requests = sorted(controls.glob("*.req"))
        for path in requests:
            if self.stop_signal is not None:
                break
            try:
                request = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            path.unlink(missing_ok=True)
            response = self.handle(request)
            self.cluster.write_cluster_json()
            _write_json_atomic(controls / f"{request.get('id', path.stem)}.resp", response)
        return bool(requests)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Carry out one `server stop|start|kill` request; the answer says how it went."""
        action = request.get("action")
        server_id = str(request.get("server"))
        cluster = self.cluster
        try:
            server = cluster.server(server_id)
            if action == "stop":
                cluster.stop_servers([server_id])
            elif action == "kill":
                cluster.kill_server(server_id)
            elif action == "start":
                if server.state == UP:
                    return {"ok": True, "message": f"{server_id} is already up"}
                ready = cluster.start_server(server_id, self.ready_timeout)
                cluster.reap()
                if not all(ready.values()):
                    late = ", ".join(s for s, ok in ready.items() if not ok)
                    return {"ok": False, "message": f"{server_id} started, but not ready: {late}"}
            else:
                return {"ok": False, "message": f"unknown action {action!r}"}
        except ClusterError as exc:
            return {"ok": False, "message": str(exc)}
        self.out(f"{server_id}: {action} done, now {server.state}")
        return {"ok": True, "message": f"{server_id} is {server.state}"}

    def _shutdown(self) -> None:
        # A second Ctrl-C must not interrupt the cleanup half way.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        cluster = self.cluster
        if any(p.popen is not None for p in cluster.processes()) or cluster.broker is not None:
            self.out("stopping the cluster")
            cluster.status = "stopping"
            with contextlib.suppress(OSError):
                cluster.write_cluster_json()
        cluster.shutdown()
        cluster.reap()
        cluster.status = "stopped"
        with contextlib.suppress(OSError):
            if cluster.cluster_json.parent.is_dir():
                cluster.write_cluster_json()


# --------------------------------------------------------------------------------------------
# What other commands (down, server, status) do, from the files of a state directory
# --------------------------------------------------------------------------------------------


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


def running_supervisor(state_dir: Path) -> int | None:
    """The pid of the live `ferrylink up` of this state directory, if any."""
    try:
        pid = int(supervisor_pid_file(state_dir).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if pid_alive(pid) and _runs_ferrylink(pid) else None


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
    pid = running_supervisor(state_dir)
    if pid is not None and pid != os.getpid():
        raise ClusterError(
            f"a cluster already runs from {state_dir} (supervisor pid {pid}); "
            "stop it with `ferrylink down` first"
        )
    if (state_dir / "cluster.json").exists():
        with contextlib.suppress(ClusterError):
            left = [
                p
                for p in cluster_pids(read_cluster_json(state_dir))
                if pid_alive(p) and _runs_ferrylink(p)
            ]
            if left:
                raise ClusterError(
                    f"processes of an earlier cluster still run from {state_dir} "
                    f"(pids {', '.join(map(str, left))}); stop them with `ferrylink down`"
                )


def find_server(doc: dict[str, Any], server_id: str) -> dict[str, Any]:
    for server in doc.get("servers", []):
        if server.get("id") == server_id:
            return dict(server)
    known = ", ".join(str(s.get("id")) for s in doc.get("servers", []))
    raise ClusterError(f"unknown server {server_id!r}; this cluster has {known or 'no servers'}")


def request_supervisor(
    state_dir: Path, action: str, server_id: str, timeout: float = READY_TIMEOUT + 30
) -> dict[str, Any]:
    """Ask the running supervisor to act on a server; wait for its answer."""
    pid = running_supervisor(state_dir)
    if pid is None:
        raise ClusterError(f"no supervisor runs for {state_dir}")
    controls = control_dir(state_dir)
    controls.mkdir(exist_ok=True)
    request_id = uuid.uuid4().hex
    request = {"id": request_id, "action": action, "server": server_id}
    _write_json_atomic(controls / f"{time.time_ns()}-{request_id}.req", request)
    response_path = controls / f"{request_id}.resp"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if response_path.exists():
            response: dict[str, Any] = json.loads(response_path.read_text())
            response_path.unlink(missing_ok=True)
            return response
        if not pid_alive(pid):
            raise ClusterError(f"the supervisor (pid {pid}) exited before answering")
        time.sleep(0.1)
    raise ClusterError(f"the supervisor did not answer {action} {server_id} in {timeout:.0f} s")


def act_without_supervisor(state_dir: Path, action: str, server_id: str) -> str:
    """`server stop|kill` when no supervisor runs: signal the recorded pids directly."""
    if action == "start":
        raise ClusterError(
            f"no supervisor runs for {state_dir}; start the cluster again with `ferrylink up`"
        )
    doc = read_cluster_json(state_dir)
    find_server(doc, server_id)
    for server in doc["servers"]:
        if server["id"] != server_id:
            continue
        pids = [p for p in cluster_pids({"servers": [server]}) if _runs_ferrylink(p)]
        if action == "kill":
            for pid in pids:
                _signal_group(pid, signal.SIGKILL)
            wait_pids_gone(pids, 30.0)
        else:
            terminate_pids(pids)
        for svc in server["services"].values():
            svc["running"] = bool(svc.get("pid")) and pid_alive(svc["pid"])
        server["state"] = DOWN
    _write_json_atomic(state_dir / "cluster.json", doc)
    return f"{server_id} is down"


def server_action(state_dir: Path, action: str, server_id: str) -> str:
    """`ferrylink server stop|start|kill ID`; returns a message or raises ClusterError."""
    doc = read_cluster_json(state_dir)
    find_server(doc, server_id)
    if running_supervisor(state_dir) is None:
        return act_without_supervisor(state_dir, action, server_id)
    response = request_supervisor(state_dir, action, server_id)
    if not response.get("ok"):
        raise ClusterError(str(response.get("message", "failed")))
    return str(response.get("message", "done"))


def down(state_dir: Path, timeout: float = 60.0) -> str:
    """Stop a cluster: signal its supervisor; if it is gone, kill the recorded pids."""
    pid = running_supervisor(state_dir)
    messages = []
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        if wait_pids_gone([pid], timeout):
            messages.append(f"supervisor {pid} did not stop in {timeout:.0f} s; SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            wait_pids_gone([pid], 10.0)
        else:
            messages.append(f"supervisor {pid} stopped the cluster")
    cluster_file = state_dir / "cluster.json"
    if not cluster_file.exists():
        if pid is None:
            return "no cluster runs here"
        return "; ".join(messages)
    doc = read_cluster_json(state_dir)
    left = [p for p in cluster_pids(doc) if pid_alive(p) and _runs_ferrylink(p)]
    if left:
        messages.append(f"stopping {len(left)} leftover processes")
        terminate_pids(left)
    broker_pid = doc.get("broker_pid")
    if (
        broker_pid
        and pid_alive(broker_pid)
        and _runs_ferrylink(broker_pid, ("rabbit", "beam", str(state_dir.resolve())))
    ):
        messages.append(f"stopping private broker {broker_pid}")
        terminate_pids([int(broker_pid)], 30.0)
    if pid is None or left:
        for server in doc.get("servers", []):
            for svc in server.get("services", {}).values():
                svc["running"] = bool(svc.get("pid")) and pid_alive(svc["pid"])
            server["state"] = DOWN
        doc["status"] = "stopped"
        _write_json_atomic(cluster_file, doc)
    if pid is None and not left:
        messages.append("nothing was running")
    return "; ".join(messages)


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


def coordinator_view(doc: dict[str, Any], timeout: float = PROBE_TIMEOUT) -> dict[str, Any] | None:
    """The coordinators' `GET /cluster` (servers with state and role, primary, epoch, mode)
    from the first coordinator that answers with it; None while no coordinator serves it."""
    with httpx.Client(timeout=timeout, headers=auth_headers(doc.get("state_dir"))) as client:
        for server in doc.get("servers", []):
            url = server.get("api_url")
            if not url or server.get("state") == DOWN:
                continue
            try:
                response = client.get(f"{url}/cluster")
                view = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError):
                continue
            if isinstance(view, dict) and isinstance(view.get("servers"), list):
                return view
    return None


def _shown(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def status_table(doc: dict[str, Any]) -> tuple[list[str], list[list[Any]], list[str]]:
    """Headers, rows and header lines of `ferrylink status`: cluster.json, a live /readyz
    probe of each service and, when a coordinator serves `GET /cluster`, its view."""
    view = coordinator_view(doc)
    by_id: dict[str, dict[str, Any]] = {}
    notes = [
        f"mode: {doc.get('mode')}  status: {doc.get('status', '?')}  "
        f"supervisor: {doc.get('supervisor_pid', '-')}",
        f"broker: {doc.get('amqp_url')}  database: {doc.get('database_url')}",
    ]
    headers = ["server", "state", "service", "pid", "port", "alive", "ready"]
    if view is not None:
        by_id = {str(s.get("id")): s for s in view["servers"] if isinstance(s, dict)}
        notes.append(
            f"primary: {_shown(view.get('primary'))}  epoch: {_shown(view.get('epoch'))}  "
            f"leader: {_shown(view.get('leader'))}  coordinator mode: {_shown(view.get('mode'))}"
        )
        headers[2:2] = ["role", "seen as", "synced"]
    rows = []
    with httpx.Client(timeout=PROBE_TIMEOUT) as client:
        for server in doc.get("servers", []):
            extra = []
            if view is not None:
                seen = by_id.get(str(server.get("id")), {})
                synced = seen.get("synchronized")
                extra = [
                    _shown(seen.get("role")),
                    _shown(seen.get("state")),
                    "-" if synced is None else ("yes" if synced else "no"),
                ]
            for name, svc in server.get("services", {}).items():
                pid = svc.get("pid")
                alive = bool(pid) and svc.get("running", True) and pid_alive(pid)
                ready = alive and probe_ready(client, f"http://{HTTP_HOST}:{svc.get('port')}")
                rows.append(
                    [
                        server.get("id"),
                        server.get("state", "?"),
                        *extra,
                        name,
                        pid if alive else "-",
                        svc.get("port"),
                        "yes" if alive else "no",
                        "yes" if ready else "no",
                    ]
                )
    return headers, rows, notes


# --------------------------------------------------------------------------------------------
# Detach
# --------------------------------------------------------------------------------------------


def start_detached(
    argv: Sequence[str], state_dir: Path, timeout: float, out: Callable[[str], None] = print
) -> int:
    """Run `ferrylink up ARGV` (without --detach) as a detached supervisor; return once its
    cluster is ready (0) or it gave up (its exit code, or 1)."""
    state_dir = state_dir.resolve()
    check_no_cluster_running(state_dir)
    (state_dir / "logs").mkdir(parents=True, exist_ok=True)
    supervisor_log = state_dir / "logs" / "supervisor.log"
    with open(supervisor_log, "ab") as log_file:
        child = subprocess.Popen(
            [sys.executable, "-m", "ferrylink_ops.cli", "up", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=os.getcwd(),
        )
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            code = child.poll()
            if code is not None:
                out(f"error: the supervisor exited with code {code}; see {supervisor_log}:")
                out(log_tail(supervisor_log, 30))
                return code or 1
            with contextlib.suppress(ClusterError, OSError):
                doc = read_cluster_json(state_dir)
                if doc.get("supervisor_pid") == child.pid and doc.get("status") == "running":
                    out(format_table(*placement_table(doc)))
                    for line in demo_lines(doc.get("demo") or {}):
                        out(line)
                    out(
                        f"cluster up in the background (supervisor pid {child.pid}, log "
                        f"{supervisor_log}); stop it with `ferrylink down --state-dir {state_dir}`"
                    )
                    return 0
            time.sleep(POLL_INTERVAL)
        out(f"error: the cluster was not ready within {timeout:.0f} s; stopping it")
    except KeyboardInterrupt:
        out("interrupted; stopping the cluster")
    child.terminate()  # the supervisor stops what it started
    try:
        child.wait(STOP_TIMEOUT + 30)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
    return 1


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


# --------------------------------------------------------------------------------------------
# Manual failover
# --------------------------------------------------------------------------------------------


def manual_failover(state_dir: Path, to: str, timeout: float = 30.0) -> str:
    """Ask a live coordinator to promote `to` (passive_legacy) and describe what was lost."""
    doc = read_cluster_json(state_dir)
    refusal = ""
    with httpx.Client(timeout=timeout, headers=auth_headers(state_dir)) as client:
        for server in doc.get("servers", []):
            url = server.get("api_url")
            if not url or server.get("state") == DOWN:
                continue
            try:
                response = client.post(f"{url}/cluster/failover", json={"to": to})
            except httpx.HTTPError:
                continue
            if response.status_code == 200:
                report = response.json()
                return (
                    f"{report['primary']} is primary now (was {report['previous_primary']}, "
                    f"epoch {report['epoch']}); lost with the old primary: "
                    f"{report['lost_events']} queued event(s), "
                    f"{report['lost_sentinel_records']} sentinel-link record(s)"
                )
            try:
                refusal = response.json().get("error", {}).get("message", response.text)
            except ValueError:
                refusal = response.text
            if response.status_code < 500:
                break
    raise ClusterError(f"failover refused: {refusal}" if refusal else "no coordinator answers")


def sync_cluster(state_dir: Path, timeout: float = 30.0) -> str:
    """Ask a live coordinator to make every server reload the whole configuration; describe
    the version each server runs afterwards (raises when one did not get there)."""
    doc = read_cluster_json(state_dir)
    with httpx.Client(timeout=timeout + 10, headers=auth_headers(state_dir)) as client:
        for server in doc.get("servers", []):
            url = server.get("api_url")
            if not url or server.get("state") == DOWN:
                continue
            try:
                response = client.post(f"{url}/cluster/sync", params={"timeout": timeout})
            except httpx.HTTPError:
                continue
            if response.status_code != 200:
                raise ClusterError(f"sync refused: {response.text}")
            report = response.json()
            lines = [f"configuration version {report['config_version']}"]
            for entry in report["servers"]:
                synced = "synchronized" if entry["synchronized"] else "OUT OF SYNC"
                lines.append(
                    f"  {entry['id']}: {entry['state']}, runs version "
                    f"{_shown(entry.get('config_version'))}, {synced}"
                )
            if not report["complete"]:
                raise ClusterError("\n".join([*lines, "not every live server synchronized"]))
            return "\n".join(lines)
    raise ClusterError("no coordinator answers")


# --------------------------------------------------------------------------------------------
# The demo account: a new user can send a file the moment `ferrylink up` is ready
# --------------------------------------------------------------------------------------------

DEMO_ACCOUNT = "demo"


def create_demo(cluster: LocalCluster) -> dict[str, Any]:
    """Account `demo` (password and key pair in STATE_DIR/demo/), a route copying its uploads
    to `archive`, and a known_hosts file with the edges' host key. Kept across restarts of
    the same state directory."""
    import asyncssh

    demo_dir = cluster.state_dir / DEMO_ACCOUNT
    demo_dir.mkdir(exist_ok=True)
    password_file, key_file = demo_dir / "password", demo_dir / "id_ed25519"
    if not password_file.exists():
        fd = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as stream:
            stream.write(secrets.token_urlsafe(18) + "\n")
    if not key_file.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment="demo@ferrylink")
        key.write_private_key(str(key_file))
        os.chmod(key_file, 0o600)
        key.write_public_key(str(key_file) + ".pub")
    public_key = Path(str(key_file) + ".pub").read_text().strip()
    tm = next(
        s.services["transaction-manager"] for s in cluster.servers
        if s.services["transaction-manager"].running
    )  # fmt: skip
    headers = auth_headers(cluster.state_dir)
    with httpx.Client(base_url=tm.url, timeout=30, headers=headers) as client:
        created = client.post("/accounts", json={
            "name": DEMO_ACCOUNT, "password": password_file.read_text().strip(),
            "ssh_public_keys": [public_key],
        })  # fmt: skip
        if created.status_code not in (201, 409):
            raise ClusterError(f"creating the demo account: {created.text}")
        if not client.get("/routes", params={"account": DEMO_ACCOUNT}).json()["items"]:
            route = client.post("/routes", json={
                "account": DEMO_ACCOUNT, "pattern": "*",
                "steps": [{"kind": "copy", "folder": "archive"}],
            })  # fmt: skip
            if route.status_code != 201:
                raise ClusterError(f"creating the demo route: {route.text}")
    host_key = cluster.edge_keys_dir / "ssh_host_ed25519_key"
    known_hosts = demo_dir / "known_hosts"
    host_public = asyncssh.read_private_key(str(host_key)).export_public_key().decode().strip()
    known_hosts.write_text(
        "".join(f"[{HTTP_HOST}]:{edge.sftp_port} {host_public}\n" for edge in cluster.edges)
    )
    edge = cluster.edges[0]
    return {
        "account": DEMO_ACCOUNT,
        "password_file": str(password_file),
        "key_file": str(key_file),
        "known_hosts": str(known_hosts),
        "ca_file": str(cluster.edge_keys_dir / "tls.crt"),
        "sftp_port": edge.sftp_port,
        "https_port": edge.https_port,
        "transfers_url": f"{tm.url}/transfers?account={DEMO_ACCOUNT}",
        "token_file": str(cluster.state_dir / "admin" / "token"),
        "archive": str(cluster.data_dir / "archive"),
    }


def demo_lines(demo: dict[str, Any]) -> list[str]:
    """Three ready-to-paste lines: SFTP in, an HTTPS upload, where the transfer shows."""
    if not demo:
        return []
    return [
        "send a file as the demo account:",
        f"  sftp -i {demo['key_file']} -o UserKnownHostsFile={demo['known_hosts']} "
        f"-P {demo['sftp_port']} {demo['account']}@{HTTP_HOST}",
        f"  curl --cacert {demo['ca_file']} -u {demo['account']}:$(cat {demo['password_file']}) "
        f"-T FILE https://{HTTP_HOST}:{demo['https_port']}/files/",
        f'  see it: curl -s -H "Authorization: Bearer $(cat {demo["token_file"]})" '
        f"'{demo['transfers_url']}'   and   ls {demo['archive']}",
    ]
