"""Partner exchanges against real servers: an asyncssh SFTP server and an HTTP(S) sink."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ferrylink.models import Partner
from services.transaction_manager.partners import (
    PartnerError,
    RemoteFile,
    list_remote,
    pull_file,
    push_file,
    remove_remote,
)
from tests.http_sink import HttpSink
from tests.sftp_server import SftpServer, generate_client_key

PASSWORD = "s3cret-Pa55word-for-tests"
USER = "acme"


@pytest.fixture(scope="module")
def client_key() -> tuple[str, str]:
    return generate_client_key()


@pytest.fixture
def sftp_factory(
    tmp_path: Path, client_key: tuple[str, str]
) -> Iterator[Callable[..., SftpServer]]:
    """Starts SFTP servers serving tmp_path/remote* (with an `inbox` folder); all are stopped,
    and their threads gone, after the test."""
    servers: list[SftpServer] = []

    def start(**kwargs: Any) -> SftpServer:
        root = tmp_path / f"remote{len(servers)}"
        (root / "inbox").mkdir(parents=True)
        kwargs.setdefault("password", PASSWORD)
        kwargs.setdefault("authorized_keys", [client_key[1]])
        server = SftpServer(root, username=USER, **kwargs).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    assert not [t for t in threading.enumerate() if t.name == "test-sftp-server"]


@pytest.fixture
def sftp(sftp_factory: Callable[..., SftpServer]) -> SftpServer:
    return sftp_factory()


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[HttpSink]:
    with HttpSink(tmp_path / "sink") as server:
        yield server


def sftp_partner(server: SftpServer, **overrides: Any) -> Partner:
    fields: dict[str, Any] = {
        "name": "acme",
        "protocol": "sftp",
        "host": server.host,
        "port": server.port,
        "username": USER,
        "password": PASSWORD,
        "remote_folder": "/inbox",
        "host_key": server.host_key_line,
        "check_host_key": True,
    }
    fields.update(overrides)
    return Partner(**fields)


def http_partner(sink: HttpSink, **overrides: Any) -> Partner:
    fields: dict[str, Any] = {"name": "web", "protocol": "http", "url": sink.url}
    fields.update(overrides)
    return Partner(**fields)


def make_file(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def assert_no_secrets(error: PartnerError, *secrets: str) -> None:
    for secret in secrets:
        for line in secret.strip().splitlines():
            assert line not in str(error)


# --------------------------------------------------------------------------------------------
# SFTP push
# --------------------------------------------------------------------------------------------


def test_push_by_password(sftp: SftpServer, tmp_path: Path) -> None:
    src = make_file(tmp_path / "out" / "invoice.csv", b"id,amount\n1,10\n")
    sent = push_file(sftp_partner(sftp), src, "invoice.csv")
    assert sent == src.stat().st_size
    assert (sftp.root / "inbox" / "invoice.csv").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in (sftp.root / "inbox").iterdir()) == ["invoice.csv"]


def test_push_by_key(sftp: SftpServer, tmp_path: Path, client_key: tuple[str, str]) -> None:
    src = make_file(tmp_path / "out" / "report.bin", os.urandom(70_000))
    partner = sftp_partner(sftp, password=None, private_key=client_key[0])
    assert push_file(partner, src, "report.bin") == 70_000
    assert (sftp.root / "inbox" / "report.bin").read_bytes() == src.read_bytes()
    assert sorted(p.name for p in (sftp.root / "inbox").iterdir()) == ["report.bin"]


def test_push_after_crash_overwrites_cleanly(sftp: SftpServer, tmp_path: Path) -> None:
    inbox = sftp.root / "inbox"
    (inbox / "data.txt").write_bytes(b"old version, longer than the new one")
    (inbox / ".data.txt.part").write_bytes(b"partial leftover of a crashed push" * 100)
    src = make_file(tmp_path / "out" / "data.txt", b"new")
    push_file(sftp_partner(sftp), src, "data.txt")
    assert (inbox / "data.txt").read_bytes() == b"new"
    assert sorted(p.name for p in inbox.iterdir()) == ["data.txt"]


def test_push_without_posix_rename_falls_back(
    sftp_factory: Callable[..., SftpServer], tmp_path: Path
) -> None:
    server = sftp_factory(posix_rename=False)
    inbox = server.root / "inbox"
    (inbox / "data.txt").write_bytes(b"old")
    src = make_file(tmp_path / "out" / "data.txt", b"replacement")
    push_file(sftp_partner(server), src, "data.txt")
    assert (inbox / "data.txt").read_bytes() == b"replacement"
    assert sorted(p.name for p in inbox.iterdir()) == ["data.txt"]


def test_push_10mb_streams(sftp: SftpServer, tmp_path: Path) -> None:
    data = os.urandom(10 * 1024 * 1024 + 123)
    src = make_file(tmp_path / "out" / "big.bin", data)
    assert push_file(sftp_partner(sftp), src, "big.bin") == len(data)
    stored = (sftp.root / "inbox" / "big.bin").read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()
    assert not (sftp.root / "inbox" / ".big.bin.part").exists()


# --------------------------------------------------------------------------------------------
# SFTP failures
# --------------------------------------------------------------------------------------------


def test_host_key_mismatch_refuses_and_writes_nothing(
    sftp: SftpServer, tmp_path: Path, client_key: tuple[str, str]
) -> None:
    src = make_file(tmp_path / "out" / "a.txt", b"secret data")
    other_host_key = generate_client_key()[1]
    partner = sftp_partner(sftp, host_key=other_host_key, private_key=client_key[0])
    with pytest.raises(PartnerError) as caught:
        push_file(partner, src, "a.txt")
    assert caught.value.retryable is False
    assert "host key does not match" in str(caught.value)
    assert_no_secrets(caught.value, PASSWORD, client_key[0])
    assert list((sftp.root / "inbox").iterdir()) == []


def test_host_key_check_without_configured_key(sftp: SftpServer, tmp_path: Path) -> None:
    src = make_file(tmp_path / "out" / "a.txt", b"x")
    with pytest.raises(PartnerError) as caught:
        push_file(sftp_partner(sftp, host_key=None), src, "a.txt")
    assert caught.value.retryable is False
    assert "no host key is configured" in str(caught.value)
    assert list((sftp.root / "inbox").iterdir()) == []


def test_host_key_check_off_accepts_the_server(sftp: SftpServer, tmp_path: Path) -> None:
    src = make_file(tmp_path / "out" / "a.txt", b"x")
    push_file(sftp_partner(sftp, host_key=None, check_host_key=False), src, "a.txt")
    assert (sftp.root / "inbox" / "a.txt").read_bytes() == b"x"


def test_wrong_password_is_not_retryable(sftp: SftpServer, tmp_path: Path) -> None:
    src = make_file(tmp_path / "out" / "a.txt", b"x")
    wrong = "Wr0ng-pa55word-xyz"
    with pytest.raises(PartnerError) as caught:
        push_file(sftp_partner(sftp, password=wrong), src, "a.txt")
    assert caught.value.retryable is False
    assert "authentication failed" in str(caught.value)
    assert_no_secrets(caught.value, wrong, PASSWORD)


def test_missing_remote_folder_is_not_retryable(sftp: SftpServer, tmp_path: Path) -> None:
    src = make_file(tmp_path / "out" / "a.txt", b"x")
    with pytest.raises(PartnerError) as caught:
        push_file(sftp_partner(sftp, remote_folder="/nope"), src, "a.txt")
    assert caught.value.retryable is False
    assert "'/nope' does not exist" in str(caught.value)
    with pytest.raises(PartnerError) as listing:
        list_remote(sftp_partner(sftp, remote_folder="/nope"))
    assert listing.value.retryable is False


def test_connection_refused_is_retryable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again before the push: nobody listens
    partner = Partner(
        name="gone",
        protocol="sftp",
        host="127.0.0.1",
        port=port,
        username=USER,
        password=PASSWORD,
        check_host_key=False,
    )
    with pytest.raises(PartnerError) as caught:
        push_file(partner, make_file(tmp_path / "a.txt", b"x"), "a.txt")
    assert caught.value.retryable is True


def test_silent_server_times_out_retryably(tmp_path: Path) -> None:
    with socket.socket() as listener:  # accepts TCP (backlog) but never speaks SSH
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        partner = Partner(
            name="mute",
            protocol="sftp",
            host="127.0.0.1",
            port=listener.getsockname()[1],
            username=USER,
            password=PASSWORD,
            check_host_key=False,
        )
        with pytest.raises(PartnerError) as caught:
            push_file(partner, make_file(tmp_path / "a.txt", b"x"), "a.txt", timeout=0.5)
    assert caught.value.retryable is True
    assert "timed out" in str(caught.value)


@pytest.mark.parametrize("name", ["../escape.txt", "a/b.txt", "..", "x\0y", "", "a\\b"])
def test_unsafe_names_are_rejected(
    sftp: SftpServer, sink: HttpSink, tmp_path: Path, name: str
) -> None:
    src = make_file(tmp_path / "out" / "a.txt", b"x")
    calls: list[Callable[[], object]] = [
        lambda: push_file(sftp_partner(sftp), src, name),
        lambda: push_file(http_partner(sink), src, name),
        lambda: pull_file(sftp_partner(sftp), name, tmp_path / "in.txt"),
        lambda: remove_remote(sftp_partner(sftp), name),
    ]
    for call in calls:
        with pytest.raises(PartnerError) as caught:
            call()
        assert caught.value.retryable is False
        assert "invalid remote file name" in str(caught.value)
    assert list((sftp.root / "inbox").iterdir()) == []
    assert sink.requests == []


# --------------------------------------------------------------------------------------------
# list, pull, remove
# --------------------------------------------------------------------------------------------


def test_list_remote_with_pattern(sftp: SftpServer) -> None:
    inbox = sftp.root / "inbox"
    (inbox / "b.csv").write_bytes(b"bb")
    (inbox / "a.csv").write_bytes(b"a")
    (inbox / "c.txt").write_bytes(b"ccc")
    (inbox / ".d.csv.part").write_bytes(b"partial")
    (inbox / "dir.csv").mkdir()
    os.utime(inbox / "a.csv", (1_700_000_000, 1_700_000_000))

    files = list_remote(sftp_partner(sftp), "*.csv")
    assert [f.name for f in files] == ["a.csv", "b.csv"]
    assert files[0] == RemoteFile("a.csv", 1, 1_700_000_000.0)
    assert files[1].size == 2
    assert [f.name for f in list_remote(sftp_partner(sftp))] == ["a.csv", "b.csv", "c.txt"]
    assert list_remote(sftp_partner(sftp), "*.xml") == []


def test_pull_file_replaces_atomically(sftp: SftpServer, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 7)
    (sftp.root / "inbox" / "order.xml").write_bytes(data)
    dest_dir = tmp_path / "local"
    dest_dir.mkdir()
    dest = dest_dir / "order.xml"
    dest.write_bytes(b"previous version")

    assert pull_file(sftp_partner(sftp), "order.xml", dest) == len(data)
    assert dest.read_bytes() == data
    assert [p.name for p in dest_dir.iterdir()] == ["order.xml"]
    # The remote file is left alone: deleting is a separate step.
    assert (sftp.root / "inbox" / "order.xml").exists()


def test_empty_file_round_trip(sftp: SftpServer, tmp_path: Path) -> None:
    src = make_file(tmp_path / "out" / "empty.txt", b"")
    assert push_file(sftp_partner(sftp), src, "empty.txt") == 0
    assert (sftp.root / "inbox" / "empty.txt").read_bytes() == b""
    assert pull_file(sftp_partner(sftp), "empty.txt", tmp_path / "back.txt") == 0
    assert (tmp_path / "back.txt").read_bytes() == b""


def test_failed_pull_keeps_the_old_file(sftp: SftpServer, tmp_path: Path) -> None:
    dest = make_file(tmp_path / "local" / "order.xml", b"previous version")
    with pytest.raises(PartnerError) as caught:
        pull_file(sftp_partner(sftp), "missing.xml", dest)
    assert caught.value.retryable is False
    assert "not found" in str(caught.value)
    assert dest.read_bytes() == b"previous version"
    assert [p.name for p in dest.parent.iterdir()] == ["order.xml"]


def test_remove_remote(sftp: SftpServer) -> None:
    target = sftp.root / "inbox" / "done.csv"
    target.write_bytes(b"x")
    partner = sftp_partner(sftp)
    remove_remote(partner, "done.csv")
    assert not target.exists()
    remove_remote(partner, "done.csv")  # already gone: fine, the step is repeatable
    with pytest.raises(PartnerError) as caught:
        remove_remote(partner, "done.csv", missing_ok=False)
    assert caught.value.retryable is False


def test_server_is_chrooted(sftp: SftpServer, tmp_path: Path) -> None:
    (tmp_path / "outside.txt").write_bytes(b"not yours")
    files = list_remote(sftp_partner(sftp, remote_folder="/../.."))
    assert "outside.txt" not in [f.name for f in files]
    with pytest.raises(PartnerError):
        pull_file(sftp_partner(sftp, remote_folder="/../.."), "outside.txt", tmp_path / "x")


# --------------------------------------------------------------------------------------------
# The test server is a real SFTP server: OpenSSH's client talks to it
# --------------------------------------------------------------------------------------------


@pytest.mark.skipif(not shutil.which("sftp"), reason="OpenSSH sftp client not installed")
def test_openssh_client_sees_pushed_file(
    sftp: SftpServer, tmp_path: Path, client_key: tuple[str, str]
) -> None:
    src = make_file(tmp_path / "out" / "hello.txt", b"hello partner\n")
    push_file(sftp_partner(sftp, password=None, private_key=client_key[0]), src, "hello.txt")

    keyfile = tmp_path / "id_ed25519"
    keyfile.write_text(client_key[0])
    keyfile.chmod(0o600)
    batch = tmp_path / "batch"
    batch.write_text("ls -l /inbox\nget /inbox/hello.txt " + str(tmp_path / "got.txt") + "\n")
    result = subprocess.run(
        [
            shutil.which("sftp") or "sftp",
            "-b",
            str(batch),
            "-P",
            str(sftp.port),
            "-i",
            str(keyfile),
            "-F",
            "/dev/null",
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            f"{USER}@{sftp.host}",
        ],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert result.returncode == 0, result.stderr
    assert "hello.txt" in result.stdout
    assert ".hello.txt.part" not in result.stdout
    assert (tmp_path / "got.txt").read_bytes() == b"hello partner\n"


# --------------------------------------------------------------------------------------------
# HTTP(S)
# --------------------------------------------------------------------------------------------


def test_http_push(sink: HttpSink, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    src = make_file(tmp_path / "out" / "a.bin", data)
    name = "report 2024#1.bin"
    assert push_file(http_partner(sink), src, name) == len(data)
    assert (sink.root / name).read_bytes() == data
    (seen,) = sink.requests
    assert seen.path == "/report%202024%231.bin"
    assert seen.headers["Content-Length"] == str(len(data))  # streamed with a known length


def test_http_push_10mb(sink: HttpSink, tmp_path: Path) -> None:
    data = os.urandom(10 * 1024 * 1024)
    src = make_file(tmp_path / "out" / "big.bin", data)
    assert push_file(http_partner(sink, url=sink.url + "/"), src, "big.bin") == len(data)
    stored = (sink.root / "big.bin").read_bytes()
    assert hashlib.sha256(stored).digest() == hashlib.sha256(data).digest()


def test_http_503_is_retryable(sink: HttpSink, tmp_path: Path) -> None:
    src = make_file(tmp_path / "out" / "a.txt", b"payload")
    sink.fail_next(1, 503)
    with pytest.raises(PartnerError) as caught:
        push_file(http_partner(sink), src, "a.txt")
    assert caught.value.retryable is True
    assert "503" in str(caught.value)
    assert not (sink.root / "a.txt").exists()
    push_file(http_partner(sink), src, "a.txt")  # the retry goes through
    assert (sink.root / "a.txt").read_bytes() == b"payload"


def test_http_404_is_not_retryable(sink: HttpSink, tmp_path: Path) -> None:
    src = make_file(tmp_path / "out" / "a.txt", b"payload")
    with pytest.raises(PartnerError) as caught:
        push_file(http_partner(sink, url=sink.url + "/no/such/place"), src, "a.txt")
    assert caught.value.retryable is False
    assert "404" in str(caught.value)


def test_http_basic_auth(tmp_path: Path) -> None:
    src = make_file(tmp_path / "out" / "a.txt", b"payload")
    with HttpSink(tmp_path / "sink", credentials=("web", PASSWORD)) as sink:
        push_file(http_partner(sink, username="web", password=PASSWORD), src, "a.txt")
        assert (sink.root / "a.txt").read_bytes() == b"payload"
        with pytest.raises(PartnerError) as caught:
            push_file(http_partner(sink, username="web", password="nope-nope"), src, "b.txt")
    assert caught.value.retryable is False
    assert "401" in str(caught.value)
    assert_no_secrets(caught.value, "nope-nope", PASSWORD)


def test_http_connection_refused_is_retryable(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    partner = Partner(name="gone", protocol="http", url=f"http://127.0.0.1:{port}")
    with pytest.raises(PartnerError) as caught:
        push_file(partner, make_file(tmp_path / "a.txt", b"x"), "a.txt")
    assert caught.value.retryable is True


def test_https_verify_tls_is_honoured(tmp_path: Path) -> None:
    src = make_file(tmp_path / "out" / "a.txt", b"payload")
    with HttpSink(tmp_path / "sink", tls=True) as sink:
        with pytest.raises(PartnerError) as caught:
            push_file(http_partner(sink), src, "a.txt")
        assert caught.value.retryable is False
        assert "certificate" in str(caught.value)
        assert not (sink.root / "a.txt").exists()
        push_file(http_partner(sink, verify_tls=False), src, "a.txt")
        assert (sink.root / "a.txt").read_bytes() == b"payload"


# --------------------------------------------------------------------------------------------
# Threads and the test server itself
# --------------------------------------------------------------------------------------------


def test_concurrent_pushes_from_worker_threads(sftp: SftpServer, tmp_path: Path) -> None:
    """Each call runs its own event loop, so worker threads can push at the same time."""
    partner = sftp_partner(sftp)
    payloads = {f"f{i}.bin": os.urandom(300_000 + i) for i in range(8)}
    errors: list[BaseException] = []

    def work(name: str, data: bytes) -> None:
        try:
            push_file(partner, make_file(tmp_path / "out" / name, data), name)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=item) for item in payloads.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(15)
    assert errors == []
    for name, data in payloads.items():
        assert (sftp.root / "inbox" / name).read_bytes() == data
    assert len(list((sftp.root / "inbox").iterdir())) == len(payloads)


def test_server_stops_cleanly_with_a_client_connected(tmp_path: Path) -> None:
    server = SftpServer(tmp_path / "root", password=PASSWORD).start()
    idle = socket.create_connection((server.host, server.port))
    try:
        idle.recv(64)  # the server's SSH banner: the connection is established
        server.stop()
    finally:
        idle.close()
    assert not [t for t in threading.enumerate() if t.name == "test-sftp-server"]
