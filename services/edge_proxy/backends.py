"""The backend servers connected to this edge, and the connection each session runs on.

The edge never dials into the secure zone: transaction managers connect to the tunnel port
and introduce themselves (`ferrylink.edge_wire`); each connection then waits, idle, in this
hub. A new partner session takes one idle connection from the backend server with the
fewest sessions on this edge, uses it for its whole life and closes it at the end (the TM
has already dialled a replacement). Only servers that should take sessions keep idle
connections here (the TM decides: in passive modes only the primary), so "connected and
idle" is the edge's whole proof that a backend is alive and eligible.

When a backend's connection breaks, every request waiting on it fails with `BackendGone`;
the session above ends with that message and the partner reconnects to a live server.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
from collections.abc import Callable
from typing import Any

from ferrylink.edge_wire import (
    HEADER,
    LOGIN_BANNED,
    PROTOCOL_VERSION,
    WireError,
    decode_header,
    decode_meta,
    encode_frame,
    set_keepalive,
)
from ferrylink.telemetry import inject_headers

log = logging.getLogger(__name__)

HELLO_TIMEOUT = 5.0
LOGIN_ATTEMPTS = 3  # a TM may close an idle connection the moment we take it: try another


class BackendGone(Exception):
    """The backend server serving a session went away."""


class NoBackend(Exception):
    """No backend server is connected to this edge (or none is eligible)."""


class BackendRefused(Exception):
    """The backend answered a request with an error (`code` says which kind)."""

    def __init__(self, code: str, message: str, answer: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.answer = answer or {}


class LoginBanned(Exception):
    """Too many failed logins from the client's address or for the account."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class TooManySessions(Exception):
    """The account already has as many sessions on this edge as the limit allows."""


class BackendConnection:
    """One TCP connection a transaction manager opened to this edge."""

    def __init__(
        self, node: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.node = node
        self.reader = reader
        self.writer = writer
        self.closed = False
        self.on_lost: list[Callable[[BackendConnection], None]] = []
        self._pending: dict[int, asyncio.Future[tuple[dict[str, Any], bytes]]] = {}
        self._next_id = 1
        self._task: asyncio.Task[None] | None = None
        # Large buffers: an upload streams through without waiting on every 32 KiB write.
        writer.transport.set_write_buffer_limits(high=4 << 20)

    def start(self) -> None:
        self._task = asyncio.create_task(self._read_forever())

    async def _read_forever(self) -> None:
        try:
            while True:
                meta_len, data_len = decode_header(await self.reader.readexactly(HEADER.size))
                meta = decode_meta(await self.reader.readexactly(meta_len))
                data = await self.reader.readexactly(data_len) if data_len else b""
                future = self._pending.pop(int(meta.get("id") or 0), None)
                if future is not None and not future.done():
                    future.set_result((meta, data))
        except (asyncio.IncompleteReadError, ConnectionError, OSError, WireError) as exc:
            if isinstance(exc, WireError):
                log.warning("backend %s sent a bad frame: %s", self.node, exc)
        finally:
            self._lost()

    def _lost(self) -> None:
        if self.closed:
            return
        self.closed = True
        gone = BackendGone(
            f"the server {self.node} handling this session went away; please reconnect"
        )
        for future in self._pending.values():
            if not future.done():
                future.set_exception(gone)
        self._pending.clear()
        with contextlib.suppress(Exception):
            self.writer.close()
        for callback in self.on_lost:
            callback(self)

    def _gone(self) -> BackendGone:
        return BackendGone(
            f"the server {self.node} handling this session went away; please reconnect"
        )

    def _write_frame(self, meta: dict[str, Any], data: bytes) -> None:
        # One write of header and data: each write to an empty transport buffer is a send
        # system call, and copying a chunk costs less than a second call.
        self.writer.write(encode_frame(meta, data) + data if data else encode_frame(meta))

    async def send(self, meta: dict[str, Any], data: bytes = b"") -> None:
        """A request without an answer (a file write); waits only for buffer room."""
        if self.closed:
            raise self._gone()
        meta["noreply"] = True
        self._write_frame(meta, data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            self._lost()
            raise self._gone() from exc

    async def request(
        self, meta: dict[str, Any], data: bytes = b""
    ) -> tuple[dict[str, Any], bytes]:
        """Send a request and wait for its answer; BackendRefused when it says no."""
        if self.closed:
            raise self._gone()
        request_id = self._next_id
        self._next_id += 1
        meta["id"] = request_id
        meta.update(inject_headers())  # W3C trace context: the TM continues this trace
        future: asyncio.Future[tuple[dict[str, Any], bytes]] = (
            asyncio.get_running_loop().create_future()
        )
        self._pending[request_id] = future
        self._write_frame(meta, data)
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            self._lost()
        answer, payload = await future
        if not answer.get("ok"):
            raise BackendRefused(
                str(answer.get("code", "failure")), str(answer.get("error", "")), answer
            )
        return answer, payload

    def close(self) -> None:
        if not self.closed:
            with contextlib.suppress(Exception):
                self.writer.close()
            if self._task is not None:
                self._task.cancel()
            self._lost()


class BackendHub:
    """The tunnel listener and the idle connections of every backend server."""

    def __init__(self, edge_id: str, secret: str, backend_wait: float) -> None:
        self.edge_id = edge_id
        self.secret = secret
        self.backend_wait = backend_wait
        self.idle: dict[str, list[BackendConnection]] = {}
        self.sessions: dict[str, int] = {}
        self.account_sessions: dict[str, int] = {}  # logged-in sessions per account
        self._changed: asyncio.Condition | None = None
        self._server: asyncio.Server | None = None

    @property
    def changed(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._accept, host, port)
        bound: int = self._server.sockets[0].getsockname()[1]
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for connections in list(self.idle.values()):
            for connection in list(connections):
                connection.close()

    def status(self) -> list[dict[str, Any]]:
        nodes = sorted(set(self.idle) | set(self.sessions))
        return [
            {"node": n, "idle": len(self.idle.get(n, [])), "sessions": self.sessions.get(n, 0)}
            for n in nodes
        ]

    @property
    def available(self) -> bool:
        return any(self.idle.values())

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        sock = writer.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                set_keepalive(sock)
        try:
            meta_len, data_len = decode_header(
                await asyncio.wait_for(reader.readexactly(HEADER.size), HELLO_TIMEOUT)
            )
            hello = decode_meta(await asyncio.wait_for(reader.readexactly(meta_len), HELLO_TIMEOUT))
            if data_len:
                raise WireError("a hello carries no data")
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, WireError) as exc:
            log.warning("tunnel connection from %s without a valid hello: %s", peer, exc)
            writer.close()
            return
        node = str(hello.get("node", ""))
        refusal = ""
        if hello.get("op") != "hello" or hello.get("version") != PROTOCOL_VERSION:
            refusal = f"unsupported hello (this edge speaks version {PROTOCOL_VERSION})"
        elif not hmac.compare_digest(str(hello.get("secret", "")).encode(), self.secret.encode()):
            refusal = "wrong edge secret"
        elif not node:
            refusal = "hello without a node id"
        if refusal:
            log.warning("refused tunnel connection from %s (%r): %s", peer, node, refusal)
            writer.write(encode_frame({"ok": False, "error": refusal}))
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            writer.close()
            return
        writer.write(encode_frame({"ok": True, "edge": self.edge_id}))
        connection = BackendConnection(node, reader, writer)
        connection.on_lost.append(self._forget_idle)
        connection.start()
        if node not in self.idle:
            log.info("backend %s connected", node)
        self.idle.setdefault(node, []).append(connection)
        async with self.changed:
            self.changed.notify_all()

    def _forget_idle(self, connection: BackendConnection) -> None:
        idle = self.idle.get(connection.node, [])
        if connection in idle:
            idle.remove(connection)
            if not idle and not self.sessions.get(connection.node):
                log.info("backend %s has no connection to this edge any more", connection.node)

    async def acquire(self) -> BackendConnection:
        """An idle connection of the backend with the fewest sessions (waits a while)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.backend_wait
        async with self.changed:
            while True:
                candidates = [n for n, idle in self.idle.items() if idle]
                if candidates:
                    node = min(candidates, key=lambda n: (self.sessions.get(n, 0), n))
                    connection = self.idle[node].pop(0)
                    self.sessions[node] = self.sessions.get(node, 0) + 1
                    return connection
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise NoBackend("no backend server is available; try again later")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.changed.wait(), remaining)

    def release(self, connection: BackendConnection) -> None:
        self.sessions[connection.node] = max(0, self.sessions.get(connection.node, 0) - 1)
        connection.close()

    async def login(
        self, credentials: dict[str, Any], current: BackendConnection | None
    ) -> tuple[BackendConnection, dict[str, Any] | None]:
        """Log in on `current` (or a fresh connection); returns the connection the session
        keeps and the backend's answer (the account and the edge limits), None when the
        login failed; LoginBanned (the connection released) when the backend's failed-login
        defender refuses the address or account. Retries on another connection only when
        the one taken turned out to be closing (nothing was checked on it yet)."""
        for _attempt in range(LOGIN_ATTEMPTS):
            connection = current if current is not None else await self.acquire()
            try:
                answer, _ = await connection.request({"op": "login", **credentials})
                return connection, answer
            except BackendRefused as exc:
                if exc.code == LOGIN_BANNED:
                    if current is None:
                        self.release(connection)
                    raise LoginBanned(str(exc), int(exc.answer.get("retry_after") or 60)) from None
                return connection, None
            except BackendGone:
                self.release(connection)
                current = None
        raise NoBackend("no backend server answered; try again later")

    def admit(self, account: str, limits: dict[str, Any]) -> None:
        """Count a logged-in session of `account`; TooManySessions past the limit the
        backend sent with the login (0: none). Every admitted session must `leave`."""
        limit = int(limits.get("sessions_per_account") or 0)
        running = self.account_sessions.get(account, 0)
        if limit and running >= limit:
            raise TooManySessions(
                f"account {account} already has {running} session(s) on this edge, the most "
                f"allowed; close one and try again"
            )
        self.account_sessions[account] = running + 1

    def leave(self, account: str) -> None:
        left = self.account_sessions.get(account, 0) - 1
        if left > 0:
            self.account_sessions[account] = left
        else:
            self.account_sessions.pop(account, None)
