"""A tiny real HTTP(S) server for tests: accepts `PUT /<name>` and stores the body.

It streams request bodies to disk, records what it saw, and can be told to fail the next N
requests with a given status, so the partner client's retry classification is exercised
over a real socket. With `tls=True` it serves HTTPS with a throw-away self-signed
certificate (to check that `verify_tls` is honoured). It can hold its answers to PUTs (a slow
partner: `hold()` until `release()`).
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import ssl
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote

_CHUNK = 64 * 1024


@dataclass
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]
    status: int
    body_bytes: int = 0


@dataclass
class _State:
    root: Path
    credentials: tuple[str, str] | None
    fail_status: int = 503
    fail_remaining: int = 0
    seen: list[SeenRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    answer: threading.Event = field(default_factory=threading.Event)
    waiting: int = 0  # PUTs held (`hold`)


def _self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1/localhost that no client trusts by default."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferrylink-test-sink")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass  # keep test output clean

    def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
        state = self.server.state
        with state.lock:
            state.waiting += 1
        state.answer.wait()  # held: a transfer under way, nothing stored yet
        with state.lock:
            state.waiting -= 1
        status, target = self._decide(state)
        received = 0
        if target is None:
            for chunk in self._body():
                received += len(chunk)  # read and drop, so the client sees our answer
        else:
            # Named so that no glob for the file's own name finds it while it is written
            # (`*orders.csv` once matched an empty temporary file of this sink).
            tmp = target.with_name(f".{target.name}.{threading.get_ident()}.part")
            try:
                with tmp.open("wb") as out:
                    for chunk in self._body():
                        received += len(chunk)
                        out.write(chunk)
                tmp.replace(target)
            finally:
                tmp.unlink(missing_ok=True)
        with state.lock:
            state.seen.append(
                SeenRequest("PUT", self.path, dict(self.headers.items()), status, received)
            )
        self.send_response(status)
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        """200 with the stored size, so a pusher can recognise a completed push."""
        state = self.server.state
        with state.lock:
            state.seen.append(SeenRequest("HEAD", self.path, dict(self.headers.items()), 0))
        raw = unquote(self.path.split("?", 1)[0].lstrip("/"))
        target = state.root / raw if raw and "/" not in raw and raw not in (".", "..") else None
        if target is not None and target.is_file():
            self.send_response(200)
            self.send_header("Content-Length", str(target.stat().st_size))
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def _decide(self, state: _State) -> tuple[int, Path | None]:
        """The status to answer and, for a success, where the body goes."""
        with state.lock:
            if state.fail_remaining > 0:
                state.fail_remaining -= 1
                return state.fail_status, None
        if state.credentials is not None:
            user, password = state.credentials
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            if self.headers.get("Authorization") != f"Basic {token}":
                return 401, None
        raw = self.path.split("?", 1)[0]
        if raw.count("/") != 1:
            return 404, None  # only /<name> exists
        name = unquote(raw[1:])
        if not name or "/" in name or name in (".", "..") or "\0" in name:
            return 400, None
        return 201, state.root / name

    def _body(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(_CHUNK, remaining))
                    if not chunk:
                        raise ConnectionError("client went away mid-body")
                    remaining -= len(chunk)
                    yield chunk
                self.rfile.readline()
        remaining = int(self.headers.get("Content-Length", "0"))
        while remaining:
            chunk = self.rfile.read(min(_CHUNK, remaining))
            if not chunk:
                raise ConnectionError("client went away mid-body")
            remaining -= len(chunk)
            yield chunk


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    state: _State


class HttpSink:
    """Stores `PUT /<name>` bodies under `root`; see the module docstring."""

    def __init__(
        self,
        root: Path,
        credentials: tuple[str, str] | None = None,
        tls: bool = False,
        port: int = 0,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # A given port: the same partner coming back after it was stopped.
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.state = _State(self.root, credentials)
        self._server.state.answer.set()
        self.tls = tls
        if tls:
            self._certdir = tempfile.TemporaryDirectory()
            cert, key = _self_signed_cert(Path(self._certdir.name))
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(cert, key)
            self._server.socket = ctx.wrap_socket(self._server.socket, server_side=True)
            self.cert_path = cert
        self.port: int = self._server.server_address[1]
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[SeenRequest]:
        with self._server.state.lock:
            return list(self._server.state.seen)

    def fail_next(self, count: int, status: int = 503) -> None:
        """Answer the next `count` requests with `status` (body read and dropped)."""
        with self._server.state.lock:
            self._server.state.fail_remaining = count
            self._server.state.fail_status = status

    def hold(self) -> None:
        """From now on a PUT waits for `release()` before its body is read and stored: to
        the pusher, a transfer under way."""
        self._server.state.answer.clear()

    def release(self) -> None:
        self._server.state.answer.set()

    @property
    def waiting(self) -> int:
        with self._server.state.lock:
            return self._server.state.waiting

    def start(self) -> HttpSink:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(10)
            self._thread = None
        self._server.server_close()
        if self.tls:
            self._certdir.cleanup()

    def __enter__(self) -> HttpSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
