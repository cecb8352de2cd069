"""SFTP upload throughput through the edge proxy, next to OpenSSH's own `sftp-server`.

In one run, with the same file, the same client (OpenSSH's `sftp` in batch mode) and the
same cipher:

- edge: `sftp` -> edge proxy (asyncssh) -> tunnel -> transaction manager -> the account's
  home on the backend storage of a one-server local cluster (the upload is complete, fsynced
  and logged as RECEIVED when `sftp` returns);
- OpenSSH: `sftp` -> a private `sshd` on a spare loopback port (its own host key and config
  in a temporary folder; the system's sshd is not touched) -> `sftp-server` -> a folder on
  the same file system.

Each way is measured with one session uploading the file, and with 8 concurrent sessions
each uploading the file (aggregate MB/s = all bytes / wall time). Rounds alternate between
the two so that a busy moment of the shared machine hits both alike; the median is kept.
Goal (issue 10): edge >= 0.8 x OpenSSH for one 512 MiB file (`--size-mib 512`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench.common import broker_url, local_cluster, report
from ferrylink_ops.admin_setup import auth_headers
from ferrylink_ops.polling import wait_until
from ferrylink_ops.processes import port_free

SSHD = Path("/usr/sbin/sshd")
SFTP_SERVER_CANDIDATES = (Path("/usr/lib/openssh/sftp-server"), Path("/usr/libexec/sftp-server"))
CONCURRENT = 8
ACCOUNT = "bench"
RATIO_GOAL = 0.8
MIB = 1 << 20


@dataclass
class Target:
    """Where `sftp` uploads to: host port, login, the folder the files land in, and the
    server's processes whose CPU time an upload costs."""

    name: str
    port: int
    user: str
    folder: Path  # on the server's side, to check and clean up the uploads
    remote_prefix: str  # the path `put` names, relative to what the server shows
    pids: list[int]
    # sshd serves each session in child processes: their CPU time is counted in the
    # master's `cutime`/`cstime` once they have exited and been reaped.
    count_children: bool = False

    def cpu_seconds(self) -> float:
        """CPU time used so far by the server side (the `sftp` client is the same both
        ways and not counted)."""
        total = 0
        for pid in self.pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            # utime, stime, cutime, cstime are fields 14-17 of stat(5); index from field 3.
            total += int(fields[11]) + int(fields[12])
            if self.count_children:
                total += int(fields[13]) + int(fields[14])
        return total / os.sysconf("SC_CLK_TCK")

    def settled(self) -> bool:
        """No session process of this server is still running (so all were reaped)."""
        if not self.count_children:
            return True
        return all(not children_of(pid) for pid in self.pids)


def children_of(pid: int) -> list[str]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    return children.read_text().split() if children.exists() else []


def make_file(folder: Path, size_mib: int) -> Path:
    """Incompressible data (random), written once and uploaded by every measurement."""
    path = folder / f"upload-{size_mib}MiB.bin"
    with path.open("wb") as stream:
        for _ in range(size_mib):
            stream.write(os.urandom(MIB))
    return path


def free_loopback_port() -> int:
    for port in range(22200, 22999):
        if port_free(port):
            return port
    raise RuntimeError("no free loopback port for sshd")


def sftp_server_path() -> Path:
    for path in SFTP_SERVER_CANDIDATES:
        if path.exists():
            return path
    raise SystemExit("OpenSSH's sftp-server is missing: apt-get install -y openssh-server")


@contextmanager
def private_sshd(work: Path, authorized_key: Path, folder: Path) -> Iterator[Target]:
    """An sshd of our own on 127.0.0.1: own host key, config, pid file and log."""
    if not SSHD.exists():
        raise SystemExit(f"{SSHD} is missing: apt-get install -y openssh-server")
    # sshd started as root needs its privilege-separation folder (the package's service
    # unit would create it); an empty folder, nothing else on the system changes.
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    host_key = work / "sshd_host_ed25519_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)],
                   check=True)  # fmt: skip
    port = free_loopback_port()
    config = work / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nPidFile {work}/sshd.pid\n"
        f"AuthorizedKeysFile {authorized_key}\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nPubkeyAuthentication yes\nPermitRootLogin yes\n"
        f"StrictModes no\nUsePAM no\nSubsystem sftp {sftp_server_path()}\nLogLevel ERROR\n"
    )
    log = (work / "sshd.log").open("wb")
    process = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)],
                               stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_until(lambda: not port_free(port) or process.poll() is not None, 20, "sshd to listen")
        if process.poll() is not None:
            raise RuntimeError(f"sshd exited: {(work / 'sshd.log').read_text()}")
        host_public = Path(f"{host_key}.pub").read_text().split()
        with (work / "known_hosts").open("a") as known:
            known.write(f"[127.0.0.1]:{port} {host_public[0]} {host_public[1]}\n")
        user = (
            os.environ.get("USER")
            or subprocess.run(
                ["id", "-un"], capture_output=True, text=True, check=True
            ).stdout.strip()
        )
        yield Target(
            "OpenSSH sftp-server",
            port,
            user,
            folder,
            str(folder) + "/",
            [process.pid],
            count_children=True,
        )
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def upload(target: Target, source: Path, name: str, cipher: str, work: Path) -> float:
    """Seconds `sftp` takes to upload `source` as `name`; fails unless it arrived whole."""
    command = f"put {source} {target.remote_prefix}{name}\n"
    started = time.perf_counter()
    result = subprocess.run(
        ["sftp", "-q", "-b", "-", "-i", str(work / "client_key"), "-o", "IdentitiesOnly=yes",
         "-o", f"UserKnownHostsFile={work / 'known_hosts'}", "-o", f"Ciphers={cipher}",
         "-o", "Compression=no", "-P", str(target.port), f"{target.user}@127.0.0.1"],
        input=command, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"upload to {target.name} failed: {result.stdout}{result.stderr}")
    arrived = target.folder / name
    if not arrived.is_file() or arrived.stat().st_size != source.stat().st_size:
        raise RuntimeError(f"upload to {target.name}: {arrived} is missing or incomplete")
    return elapsed


@dataclass
class Measurement:
    mb_s: float  # all sessions' bytes / wall time
    cpu_s_per_gb: float  # server-side CPU seconds per GB uploaded


def measure(target: Target, source: Path, sessions: int, cipher: str, work: Path) -> Measurement:
    """`sessions` concurrent uploads of `source` (the files are removed afterwards)."""
    names = [f"{target.name.split()[0].lower()}-{i}-{time.monotonic_ns()}.bin"
             for i in range(sessions)]  # fmt: skip
    cpu_before = target.cpu_seconds()
    started = time.perf_counter()
    with ThreadPoolExecutor(sessions) as pool:
        list(pool.map(lambda n: upload(target, source, n, cipher, work), names))
    elapsed = time.perf_counter() - started
    wait_until(target.settled, 30, f"{target.name}'s session processes to end", 0.05)
    cpu = target.cpu_seconds() - cpu_before
    for name in names:
        (target.folder / name).unlink(missing_ok=True)
    uploaded = sessions * source.stat().st_size
    return Measurement(uploaded / 1e6 / elapsed, cpu / (uploaded / 1e9))


def edge_target(cluster_doc: dict[str, Any], tm_url: str, state_dir: Path, work: Path) -> Target:
    """A `bench` account (the client key; no route, so the upload is the only work) and the
    edge's host key in known_hosts."""
    public_key = (work / "client_key.pub").read_text().strip()
    created = httpx.post(f"{tm_url}/accounts", timeout=30, headers=auth_headers(state_dir),
                         json={"name": ACCOUNT, "ssh_public_keys": [public_key]})  # fmt: skip
    created.raise_for_status()
    edge = cluster_doc["edges"][0]
    host_key = state_dir / "edge-keys" / "ssh_host_ed25519_key"
    host_public = subprocess.run(["ssh-keygen", "-y", "-f", str(host_key)], capture_output=True,
                                 text=True, check=True).stdout.split()  # fmt: skip
    with (work / "known_hosts").open("a") as known:
        known.write(f"[127.0.0.1]:{edge['sftp_port']} {host_public[0]} {host_public[1]}\n")
    home = state_dir / "data" / created.json()["home"]
    tm_pid = cluster_doc["servers"][0]["services"]["transaction-manager"]["pid"]
    return Target("edge proxy", int(edge["sftp_port"]), ACCOUNT, home, "",
                  [int(edge["pid"]), int(tm_pid)])  # fmt: skip


def run(size_mib: int, rounds: int, cipher: str) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ferrylink-bench-edge-"))
    samples: dict[str, dict[int, list[Measurement]]] = {
        "edge": {1: [], CONCURRENT: []},
        "openssh": {1: [], CONCURRENT: []},
    }
    try:
        source = make_file(work, size_mib)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f",
                        str(work / "client_key")], check=True)  # fmt: skip
        openssh_folder = work / "openssh-uploads"
        openssh_folder.mkdir()
        with (
            broker_url() as url,
            local_cluster(1, "active_active", url) as cluster,
            private_sshd(work, work / "client_key.pub", openssh_folder) as openssh,
        ):
            doc = cluster.doc()
            tm_url = f"http://127.0.0.1:{cluster.port('st1', 'transaction-manager')}"
            edge = edge_target(doc, tm_url, cluster.state_dir, work)
            edge_api = f"http://127.0.0.1:{doc['edges'][0]['port']}/readyz"
            wait_until(lambda: httpx.get(edge_api, timeout=2).status_code == 200, 60,
                       "the edge to have a backend")  # fmt: skip
            # One unmeasured upload each way: caches warm, the edge's idle connections dialled.
            for target in (edge, openssh):
                upload(target, source, "warm-up.bin", cipher, work)
                (target.folder / "warm-up.bin").unlink()
            for number in range(1, rounds + 1):
                for sessions in (1, CONCURRENT):
                    for key, target in (("edge", edge), ("openssh", openssh)):
                        found = measure(target, source, sessions, cipher, work)
                        samples[key][sessions].append(found)
                        print(f"round {number}: {target.name}, {sessions} session(s): "
                              f"{found.mb_s:.1f} MB/s, server CPU "
                              f"{found.cpu_s_per_gb:.2f} s/GB", flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def compare(sessions: int) -> dict[str, float]:
        def median(key: str, field: str) -> float:
            return statistics.median(getattr(m, field) for m in samples[key][sessions])

        return {
            "edge_mb_s": median("edge", "mb_s"),
            "openssh_mb_s": median("openssh", "mb_s"),
            "ratio": median("edge", "mb_s") / median("openssh", "mb_s"),
            "edge_cpu_s_per_gb": median("edge", "cpu_s_per_gb"),
            "openssh_cpu_s_per_gb": median("openssh", "cpu_s_per_gb"),
            "cpu_ratio": median("edge", "cpu_s_per_gb") / median("openssh", "cpu_s_per_gb"),
        }

    return {
        "file_mib": size_mib,
        "cipher": cipher,
        "rounds": rounds,
        "client": "OpenSSH sftp (batch mode), default request size and count",
        "single_session": compare(1),
        "concurrent_sessions": CONCURRENT,
        "concurrent": compare(CONCURRENT),
        "ratio_goal": RATIO_GOAL,
        "samples": {
            key: {str(n): [vars(m) for m in found] for n, found in by_sessions.items()}
            for key, by_sessions in samples.items()
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mib", type=int, default=64, help="file size (default 64)")
    parser.add_argument("--rounds", type=int, default=3, help="measurements each way")
    parser.add_argument(
        "--cipher",
        default="aes128-gcm@openssh.com",
        help="SSH cipher both sides use (default aes128-gcm@openssh.com)",
    )
    args = parser.parse_args(argv)
    data = run(args.size_mib, args.rounds, args.cipher)
    rows = []
    for label, key in (
        (f"1 session, {args.size_mib} MiB", "single_session"),
        (f"{CONCURRENT} sessions x {args.size_mib} MiB", "concurrent"),
    ):
        found = data[key]
        rows.append(
            [
                label,
                f"{found['edge_mb_s']:.1f}",
                f"{found['openssh_mb_s']:.1f}",
                f"{found['ratio']:.2f}",
                f"{found['edge_cpu_s_per_gb']:.2f}",
                f"{found['openssh_cpu_s_per_gb']:.2f}",
                f"{found['cpu_ratio']:.1f}",
            ]
        )
    # fmt: skip
    print(f"\nSFTP upload, cipher {args.cipher}, median of {args.rounds} rounds "
          f"(goal: edge/OpenSSH >= {RATIO_GOAL} MB/s for one 512 MiB file)")  # fmt: skip
    report("edge", rows, ["upload", "edge MB/s", "OpenSSH MB/s", "edge/OpenSSH",
                          "edge CPU s/GB", "OpenSSH CPU s/GB", "CPU edge/OpenSSH"],
           data)  # fmt: skip
    return data


if __name__ == "__main__":
    main()
