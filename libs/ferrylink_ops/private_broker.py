"""Private RabbitMQ nodes started from the machine's `rabbitmq-server`, on spare loopback ports.

Tests and the local cluster runner use these instead of the shared broker, so fault drills
can kill and restart nodes without disturbing anyone else (see DESIGN.md, "Running and
testing").

Every node (and every `rabbitmqctl` call) runs under a tiny Python "reaper" parent that is a
child subreaper. It does two jobs: it reaps the VM's orphaned helpers (`erl_child_setup`,
`inet_gethost`) at once, so "no process left" holds the moment `stop()`/`kill()` return
(this machine's PID 1 reaps orphans only a second or two later); and it SIGKILLs its node
when the owning Python process dies (its stdin pipe closes), so a crashed or killed test run
never leaves brokers behind. A node therefore lives only as long as its `BrokerNode` object.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

import pika
import pika.exceptions
from pika.adapters.utils.connection_workflow import AMQPConnectorException

from ferrylink_ops.processes import log_tail, pid_alive, signal_group

__all__ = [
    "BrokerCommandError",
    "BrokerError",
    "BrokerNode",
    "BrokerNotInstalledError",
    "BrokerStartError",
    "find_node_pids",
    "find_rabbitmq_scripts",
    "is_broker_reachable",
    "pick_free_port",
    "rabbitmq_installed",
    "start_broker_cluster",
    "start_private_broker",
    "stop_all",
]

# Debian/Ubuntu keep the real scripts here; /usr/sbin/rabbitmq-server is a wrapper that
# `su`s to the rabbitmq user when run as root, losing our HOME (cookie) and environment.
DEBIAN_SCRIPTS_DIR = Path("/usr/lib/rabbitmq/bin")

# Ports handed to private nodes: below Linux's ephemeral range (32768-60999), so an outgoing
# connection cannot grab a port between the free-check and the node's bind, and away from
# the shared broker's 5672/25672 and rabbitmqctl's 35672+ distribution ports.
PORT_RANGE = (20000, 32000)
_AVOID_PORTS = frozenset({25672})
_CTL_DIST_PORT_MIN = 35672
_CTL_DIST_PORT_MAX = 35772  # wider than the default 10 ports: CLI calls run in parallel

DEFAULT_START_TIMEOUT = 90.0
DEFAULT_STOP_TIMEOUT = 60.0
_POLL_INTERVAL = 0.2

# Environment variables (with and without the RABBITMQ_ prefix, as rabbitmq-env.conf spells
# them) that must not leak from the caller into a private node.
_UNPREFIXED_VARS = frozenset(
    {
        "NODENAME", "NODE_IP_ADDRESS", "NODE_PORT", "DIST_PORT", "CONFIG_FILE",
        "CONFIG_FILES", "ADVANCED_CONFIG_FILE", "CONF_ENV_FILE", "MNESIA_BASE", "MNESIA_DIR",
        "LOG_BASE", "LOGS", "PID_FILE", "ENABLED_PLUGINS_FILE", "PLUGINS_DIR",
        "PLUGINS_EXPAND_DIR", "SERVER_ERL_ARGS", "SERVER_ADDITIONAL_ERL_ARGS",
        "SERVER_START_ARGS", "USE_LONGNAME", "CTL_ERL_ARGS", "NOTIFY_SOCKET",
    }
)  # fmt: skip

_REAPER_SCRIPT = r"""
import ctypes, os, signal, sys, threading, time
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except (AttributeError, OSError):
    pass
pid_file, argv = sys.argv[1], sys.argv[2:]
child = os.fork()
if child == 0:
    try:
        os.setpgid(0, 0)
        os.execvp(argv[0], argv)
    except OSError as exc:
        sys.stderr.write("reaper: cannot run %r: %s\n" % (argv[0], exc))
    os._exit(127)
try:
    os.setpgid(child, child)
except OSError:
    pass
done = threading.Event()
def kill_child(*_):
    if not done.is_set():
        try:
            os.killpg(child, signal.SIGKILL)
        except OSError:
            pass
for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
    signal.signal(sig, kill_child)
def watch_owner():
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except OSError:
        pass
    kill_child()
threading.Thread(target=watch_owner, daemon=True).start()
if pid_file != "-":
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(child))
    os.replace(pid_file + ".tmp", pid_file)
while True:
    pid, status = os.wait()
    if pid == child:
        done.set()
        break
deadline = time.monotonic() + 3.0
while time.monotonic() < deadline:
    try:
        pid, _ = os.waitpid(-1, os.WNOHANG)
    except ChildProcessError:
        break
    if pid == 0:
        time.sleep(0.02)
code = os.waitstatus_to_exitcode(status)
sys.stderr.flush()
os._exit(128 - code if code < 0 else code)  # not sys.exit: the stdin thread is blocked
"""

_T = TypeVar("_T")


class BrokerError(RuntimeError):
    """Base class for private-broker failures."""


class BrokerNotInstalledError(BrokerError):
    """rabbitmq-server is not installed on this machine."""


class BrokerStartError(BrokerError):
    """A node did not boot; the message carries the tail of its logs."""

    def __init__(self, message: str, *, port_conflict: bool = False) -> None:
        super().__init__(message)
        self.port_conflict = port_conflict


class BrokerCommandError(BrokerError):
    """A rabbitmqctl command failed or timed out."""


def find_rabbitmq_scripts() -> tuple[Path, Path]:
    """Return the (rabbitmq-server, rabbitmqctl) scripts that run as the calling user.

    Prefers Debian's /usr/lib/rabbitmq/bin because the /usr/sbin wrappers switch to the
    rabbitmq user when run as root.
    """
    search = os.pathsep.join(
        p for p in (os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin") if p
    )
    found = shutil.which("rabbitmq-server", path=search)
    candidates = [DEBIAN_SCRIPTS_DIR]
    if found is not None:
        candidates.append(Path(os.path.realpath(found)).parent)
    for directory in candidates:
        server, ctl = directory / "rabbitmq-server", directory / "rabbitmqctl"
        if server.is_file() and ctl.is_file() and os.access(server, os.X_OK):
            return server, ctl
    raise BrokerNotInstalledError(
        "rabbitmq-server is not installed (looked in PATH, /usr/sbin and "
        f"{DEBIAN_SCRIPTS_DIR}); install the rabbitmq-server package or set FERRYLINK_AMQP_URL"
    )


def rabbitmq_installed() -> bool:
    """True when private nodes can be started here."""
    try:
        find_rabbitmq_scripts()
    except BrokerNotInstalledError:
        return False
    return True


_reserved_ports: set[int] = set()
_reserved_lock = threading.Lock()


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port free on `host` right now and never handed out before by this process."""
    rng = random.SystemRandom()
    with _reserved_lock:
        for _ in range(500):
            port = rng.randrange(*PORT_RANGE)
            if port in _reserved_ports or port in _AVOID_PORTS:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _reserved_ports.add(port)
            return port
    raise BrokerError(f"no free port on {host} in {PORT_RANGE}")


def _port_accepts(host: str, port: int, timeout: float) -> bool:
    """Cheap TCP probe, so polling a booting node does not fill logs with pika errors."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def is_broker_reachable(url: str, timeout: float = 2.0) -> bool:
    """True when an AMQP connection to `url` opens (and is closed again) within `timeout`."""
    try:
        params = pika.URLParameters(url)
    except (ValueError, TypeError):
        return False
    if not _port_accepts(params.host, params.port, timeout):
        return False
    params.connection_attempts = 1
    params.socket_timeout = timeout
    params.stack_timeout = timeout
    params.blocked_connection_timeout = timeout
    try:
        connection = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, AMQPConnectorException, OSError):
        # AMQPConnectorException: the port answered but the handshake timed out (a busy or
        # wedged broker): not reachable either.
        return False
    with contextlib.suppress(pika.exceptions.AMQPError, OSError):
        connection.close()
    return True


def find_node_pids(names: Iterable[str]) -> list[int]:
    """Live processes started for the given node names (found by RABBITMQ_NODENAME).

    The beam's command line does not carry the node name (RabbitMQ sets it up after boot),
    so the environment is the reliable mark. Covers the node's beam and its reaper.
    """
    wanted = {f"RABBITMQ_NODENAME={name}".encode() for name in names}
    found: list[int] = []
    proc = Path("/proc")
    if not wanted or not proc.is_dir():
        return found
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if wanted.intersection(environ.split(b"\0")) and pid_alive(int(entry.name)):
            found.append(int(entry.name))
    return found


_cookie_lock = threading.Lock()


def _write_cookie(home: Path) -> None:
    """Give `home` an Erlang cookie unless it has one: nodes sharing a HOME can cluster."""
    home.mkdir(parents=True, exist_ok=True)
    cookie = home / ".erlang.cookie"
    with _cookie_lock:
        if not cookie.exists():
            tmp = home / f".erlang.cookie.{secrets.token_hex(4)}.tmp"
            tmp.write_text(secrets.token_hex(16).upper())
            tmp.chmod(0o400)
            os.replace(tmp, cookie)
    # Our own (empty) rabbitmq-env.conf: the machine's /etc/rabbitmq/rabbitmq-env.conf sets
    # NODENAME=rabbit@localhost, which a private node or CLI call must never pick up.
    (home / "rabbitmq-env.conf").touch()


def _erlang_ip_tuple(host: str) -> str:
    """`127.0.0.1` -> `{127,0,0,1}` for `-kernel inet_dist_use_interface`."""
    return "{" + ",".join(str(byte) for byte in socket.inet_aton(host)) + "}"


def _base_env(home: Path) -> dict[str, str]:
    """The caller's environment minus anything RabbitMQ/Erlang, plus our HOME and conf file."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("RABBITMQ_", "ERL_")) and key not in _UNPREFIXED_VARS
    }
    env.update(
        HOME=str(home),
        RABBITMQ_CONF_ENV_FILE=str(home / "rabbitmq-env.conf"),
        ERL_EPMD_ADDRESS="127.0.0.1",
        RABBITMQ_CTL_DIST_PORT_MIN=str(_CTL_DIST_PORT_MIN),
        RABBITMQ_CTL_DIST_PORT_MAX=str(_CTL_DIST_PORT_MAX),
        RABBITMQ_CTL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
    )
    return env


def _reaper_command(pid_file: str, argv: Sequence[str]) -> list[str]:
    return [sys.executable or "python3", "-I", "-c", _REAPER_SCRIPT, pid_file, *argv]


def _ensure_epmd() -> None:
    """Start epmd (loopback only) if none answers, so no node's reaper adopts the daemon."""
    if _port_accepts("127.0.0.1", int(os.environ.get("ERL_EPMD_PORT", "4369")), 1.0):
        return
    epmd = shutil.which("epmd") or shutil.which("epmd", path="/usr/lib/erlang/bin")
    if epmd is None:
        return  # erl starts it itself; the reaper then waits 3 s for it on exit
    subprocess.run(
        [epmd, "-address", "127.0.0.1", "-daemon"],
        check=False,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=10,
    )
    deadline = time.monotonic() + 5.0
    while not _port_accepts("127.0.0.1", 4369, 0.5) and time.monotonic() < deadline:
        time.sleep(0.05)


class BrokerNode:
    """One private RabbitMQ node: its own name, ports, data and log dirs under `base_dir`."""

    def __init__(
        self,
        base_dir: Path,
        *,
        name: str | None = None,
        amqp_port: int | None = None,
        dist_port: int | None = None,
        home: Path | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        self.base_dir = Path(base_dir).resolve()
        self.name = name or f"flk-{secrets.token_hex(3)}-1@localhost"
        self.host = host
        self.home = Path(home).resolve() if home else self.base_dir / "home"
        self.amqp_port = amqp_port or pick_free_port(host)
        self.dist_port = dist_port or pick_free_port(host)
        self._reaper: subprocess.Popen[bytes] | None = None
        self._beam_pid: int | None = None
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        return f"<BrokerNode {self.name} amqp={self.amqp_port} dist={self.dist_port} {state}>"

    # -- paths and settings -------------------------------------------------------------

    @property
    def url(self) -> str:
        """AMQP URL of this node, as guest on the default vhost."""
        return f"amqp://guest:guest@{self.host}:{self.amqp_port}/%2F"

    @property
    def beam_pid(self) -> int | None:
        """OS pid of the node's Erlang VM (beam.smp) while it runs."""
        return self._beam_pid if self.is_running() else None

    @property
    def log_file(self) -> Path:
        return self.base_dir / "log" / f"{self.name}.log"

    @property
    def console_log(self) -> Path:
        return self.base_dir / "console.log"

    @property
    def rabbit_pid_file(self) -> Path:
        return self.base_dir / "rabbitmq.pid"

    @property
    def _child_pid_file(self) -> Path:
        return self.base_dir / "launcher-child.pid"

    def _config_text(self) -> str:
        return "\n".join(
            [
                f"listeners.tcp.default = {self.host}:{self.amqp_port}",
                "loopback_users = none",
                "cluster_partition_handling = pause_minority",
                # Small disks and busy test machines must not trip the publisher-blocking alarms.
                "disk_free_limit.absolute = 50MB",
                "vm_memory_high_watermark.relative = 0.8",
                "log.console = false",
                "log.file.level = info",
                "",
            ]
        )

    def _prepare_files(self) -> None:
        for sub in ("mnesia", "log", "conf.d"):
            (self.base_dir / sub).mkdir(parents=True, exist_ok=True)
        _write_cookie(self.home)
        (self.base_dir / "rabbitmq.conf").write_text(self._config_text())
        (self.base_dir / "enabled_plugins").write_text("[].\n")

    def _server_env(self) -> dict[str, str]:
        env = _base_env(self.home)
        env.update(
            RABBITMQ_NODENAME=self.name,
            RABBITMQ_NODE_IP_ADDRESS=self.host,
            RABBITMQ_NODE_PORT=str(self.amqp_port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_MNESIA_BASE=str(self.base_dir / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base_dir / "log"),
            RABBITMQ_CONFIG_FILE=str(self.base_dir / "rabbitmq.conf"),
            RABBITMQ_CONFIG_FILES=str(self.base_dir / "conf.d"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(self.base_dir / "advanced.config"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base_dir / "enabled_plugins"),
            RABBITMQ_PID_FILE=str(self.rabbit_pid_file),
            # ALLOW_INPUT makes the script exec erl instead of forking it behind a shell,
            # so the reaper's child *is* beam.smp; -noinput keeps the shell off stdin.
            RABBITMQ_ALLOW_INPUT="true",
            RABBITMQ_SERVER_START_ARGS="-noinput +B i",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=(
                f"-kernel inet_dist_use_interface {_erlang_ip_tuple(self.host)}"
            ),
            # Several VMs share two cores here: do not pin schedulers to CPUs.
            RABBITMQ_SCHEDULER_BIND_TYPE="u",
            ERL_CRASH_DUMP=str(self.base_dir / "log" / "erl_crash.dump"),
        )
        return env

    # -- lifecycle -----------------------------------------------------------------------

    def is_running(self) -> bool:
        """True while the node's process tree exists (booting, ready or paused)."""
        return self._reaper is not None and self._reaper.poll() is None

    def start(self) -> None:
        """Spawn the node in its own session; returns once the VM's pid is known."""
        with self._lock:
            if self.is_running():
                raise BrokerError(f"{self.name} is already running")
            self._release()
            server, _ = find_rabbitmq_scripts()
            _ensure_epmd()
            self._prepare_files()
            for stale in (self._child_pid_file, self.rabbit_pid_file):
                stale.unlink(missing_ok=True)
            with self.console_log.open("ab") as console:
                self._reaper = subprocess.Popen(
                    _reaper_command(str(self._child_pid_file), [str(server)]),
                    env=self._server_env(),
                    cwd=self.base_dir,
                    stdin=subprocess.PIPE,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            self._beam_pid = self._await_child_pid(self._reaper, deadline=time.monotonic() + 15)

    def _await_child_pid(self, reaper: subprocess.Popen[bytes], deadline: float) -> int:
        while True:
            try:
                return int(self._child_pid_file.read_text())
            except (FileNotFoundError, ValueError):
                pass
            if reaper.poll() is not None or time.monotonic() > deadline:
                self._force_kill_reaper()
                raise BrokerStartError(
                    f"{self.name}: launcher did not start:\n{log_tail(self.console_log, 25)}"
                )
            time.sleep(0.01)

    def wait_ready(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Block until the node accepts AMQP connections; fail fast if the VM exits."""
        deadline = time.monotonic() + timeout
        while True:
            reaper = self._reaper
            if reaper is None:
                raise BrokerError(f"{self.name} was not started")
            code = reaper.poll()
            if code is not None:
                raise self._start_error(f"exited with status {code} while booting")
            if is_broker_reachable(self.url, timeout=3.0):
                return
            if time.monotonic() > deadline:
                raise self._start_error(f"not ready after {timeout:.0f} s")
            time.sleep(_POLL_INTERVAL)

    def _start_error(self, what: str) -> BrokerStartError:
        logs = f"{log_tail(self.console_log, 25)}\n{log_tail(self.log_file, 25)}"
        return BrokerStartError(
            f"{self.name} (amqp {self.amqp_port}, dist {self.dist_port}) {what}:\n{logs}",
            port_conflict="eaddrinuse" in logs,
        )

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop cleanly with `rabbitmqctl stop`; SIGKILL whatever is left at the deadline."""
        with self._lock:
            reaper = self._reaper
            if reaper is None or reaper.poll() is not None:
                self._release()
                return
            deadline = time.monotonic() + timeout
            with contextlib.suppress(BrokerCommandError):
                self.ctl("stop", timeout=max(5.0, timeout / 2))
            try:
                reaper.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.kill()
            self._release()

    def kill(self) -> None:
        """Fault drill: SIGKILL the node's Erlang VM and its process group, and prove it died."""
        with self._lock:
            reaper = self._reaper
            if reaper is None or reaper.poll() is not None:
                self._release()  # already gone: its pids may belong to others by now
                return
            pids = {pid for pid in (self._beam_pid, self._rabbit_pid()) if pid}
            for pid in pids:
                signal_group(pid, signal.SIGKILL)
            try:
                # The reaper exits only after it has reaped the VM.
                reaper.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self._force_kill_reaper()
            survivors = [pid for pid in pids if pid_alive(pid)]
            self._release()
            if survivors:
                raise BrokerError(f"{self.name}: pids {survivors} survived SIGKILL")

    def restart(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Start again on the same name, ports and data (e.g. after `kill()`); rejoins its
        cluster from the data dir."""
        if self.is_running():
            raise BrokerError(f"{self.name} is still running; stop() or kill() it first")
        self.start()
        self.wait_ready(timeout)

    def _rabbit_pid(self) -> int | None:
        """The pid RabbitMQ itself wrote (os:getpid()), to cross-check the reaper's child."""
        try:
            pid = int(self.rabbit_pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid in find_node_pids([self.name]) else None

    def _force_kill_reaper(self) -> None:
        reaper = self._reaper
        if reaper is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(reaper.pid, signal.SIGKILL)
        if self._beam_pid:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._beam_pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            reaper.wait(timeout=10)

    def _release(self) -> None:
        """Forget a finished process tree (closing the owner pipe the reaper watches)."""
        reaper = self._reaper
        if reaper is not None:
            if reaper.poll() is None:
                return  # still running: keep it (closing stdin would kill it)
            _close(reaper.stdin)
        self._reaper = None
        self._beam_pid = None

    # -- rabbitmqctl ---------------------------------------------------------------------

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run `rabbitmqctl -n <this node> ARGS` with our cookie; return its output."""
        _, ctl = find_rabbitmq_scripts()
        _write_cookie(self.home)
        argv = [str(ctl), "-n", self.name, *args]
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(
                _reaper_command("-", argv),
                env=_base_env(self.home),
                cwd=self.base_dir if self.base_dir.is_dir() else None,
                stdin=subprocess.PIPE,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            timed_out = False
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                _close(proc.stdin)  # tells the reaper to kill the CLI if still running
            if timed_out:
                code = proc.wait(timeout=15)
            out.seek(0)
            text = out.read().decode(errors="replace")
        if timed_out or code != 0:
            what = f"timed out after {timeout:.0f} s" if timed_out else f"exit status {code}"
            raise BrokerCommandError(f"rabbitmqctl -n {self.name} {' '.join(args)}: {what}\n{text}")
        return text

    def running_nodes(self) -> list[str]:
        """Cluster members this node sees running (`rabbitmqctl cluster_status`)."""
        text = self.ctl("-q", "cluster_status", "--formatter", "json", timeout=30)
        data = json.loads(text[text.index("{") :])
        return sorted(str(n) for n in data.get("running_nodes", []))

    def join_cluster(self, seed: BrokerNode, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Make this (running, empty) node a member of `seed`'s cluster."""
        self.ctl("stop_app")
        self.ctl("join_cluster", seed.name)
        self.ctl("start_app", timeout=timeout)
        self.wait_ready(timeout)


def _close(stream: IO[bytes] | None) -> None:
    if stream is not None:
        with contextlib.suppress(OSError):
            stream.close()


def _boot(node: BrokerNode, timeout: float, attempts: int = 3) -> BrokerNode:
    """Start and wait for a fresh node, moving it to new ports if someone took its ports."""
    for attempt in range(attempts):
        node.start()
        try:
            node.wait_ready(timeout)
            return node
        except BrokerStartError as exc:
            node.kill()
            if not exc.port_conflict or attempt == attempts - 1:
                raise
            node.amqp_port = pick_free_port(node.host)
            node.dist_port = pick_free_port(node.host)
    raise AssertionError("unreachable")


def _parallel(func: Callable[[_T], object], items: Sequence[_T]) -> None:
    """Run `func` over `items` in threads; wait for all, then raise the first error."""
    if not items:
        return
    with ThreadPoolExecutor(max_workers=len(items)) as pool:
        futures = [pool.submit(func, item) for item in items]
    for future in futures:
        error = future.exception()
        if error is not None:
            raise error


def start_private_broker(base_dir: Path, timeout: float = DEFAULT_START_TIMEOUT) -> BrokerNode:
    """One private node under `base_dir`, started and accepting connections."""
    base_dir = Path(base_dir)
    node = BrokerNode(
        base_dir / "node1",
        name=f"flk-{secrets.token_hex(3)}-1@localhost",
        home=base_dir / "home",
    )
    _boot(node, timeout)
    return node


def start_broker_cluster(
    base_dir: Path, size: int = 3, timeout: float = DEFAULT_START_TIMEOUT
) -> list[BrokerNode]:
    """`size` nodes sharing one cookie, booted in parallel and joined to the first one."""
    if size < 1:
        raise ValueError("size must be at least 1")
    base_dir = Path(base_dir)
    token = secrets.token_hex(3)
    home = base_dir / "home"
    nodes = [
        BrokerNode(base_dir / f"node{i}", name=f"flk-{token}-{i}@localhost", home=home)
        for i in range(1, size + 1)
    ]
    _write_cookie(home)  # one cookie for all, before the parallel boot
    try:
        _parallel(lambda node: _boot(node, timeout), nodes)
        seed = nodes[0]
        # One join at a time: concurrent mnesia joins into the same cluster are not safe.
        for node in nodes[1:]:
            node.join_cluster(seed, timeout)
        expected = sorted(node.name for node in nodes)
        deadline = time.monotonic() + timeout
        while seed.running_nodes() != expected:
            if time.monotonic() > deadline:
                raise BrokerStartError(f"cluster did not form: {seed.running_nodes()}")
            time.sleep(_POLL_INTERVAL)
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def stop_all(nodes: Iterable[BrokerNode], timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
    """Stop every node (cleanly where possible), then kill anything of theirs still alive.

    Never raises: it is meant for `finally` blocks, including after `kill()`.
    """
    nodes = list(nodes)

    def stop_one(node: BrokerNode) -> None:
        try:
            node.stop(timeout)
        except Exception:
            with contextlib.suppress(Exception):
                node.kill()

    with contextlib.suppress(Exception):
        _parallel(stop_one, nodes)
    for node in nodes:
        with contextlib.suppress(Exception):
            node.kill()
    for pid in find_node_pids(node.name for node in nodes):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
