"""The wire format between an edge proxy and the transaction managers that dial out to it.

Every message is one frame: an 8-byte header `!II` (length of a JSON object, length of raw
data), the JSON object (`meta`), then the raw data (file bytes, possibly empty). Both the
edge (asyncio) and the transaction manager (blocking threads) read and write frames with
the helpers here, so the format lives in one place.

The conversation on one TCP connection (opened by the transaction manager):

1. TM -> edge `{"op": "hello", "version": 1, "node": "st1", "secret": "..."}`;
   edge -> TM `{"ok": true, "edge": "edge1"}` (or `ok: false` and the connection closes).
2. The connection waits, idle, until the edge gives it to one partner session (one SSH
   connection or one HTTPS request). From then on the edge sends requests
   `{"id": N, "op": ..., ...}` and the TM answers each with `{"id": N, "ok": true, ...}` or
   `{"id": N, "ok": false, "code": "...", "error": "a message for the partner"}`,
   in order. Requests marked `"noreply": true` (file writes) get no answer; a failed write
   is reported by the `close` of its handle.
3. The session ends when either side closes the connection; connections are not reused.
"""

from __future__ import annotations

import json
import socket
import struct
from typing import Any

PROTOCOL_VERSION = 1
HEADER = struct.Struct("!II")
MAX_META = 1 << 20  # a listing of a big folder travels as one JSON object
MAX_DATA = 8 << 20

# Error codes a TM answers with; the edge maps them onto SFTP status codes / HTTP statuses.
NO_SUCH_FILE = "no_such_file"
PERMISSION_DENIED = "permission_denied"
BAD_REQUEST = "bad_request"
AUTH_FAILED = "auth_failed"
# Too many failed logins from the address or for the account: `retry_after` seconds.
LOGIN_BANNED = "login_banned"
FAILURE = "failure"
TOO_LARGE = "too_large"  # the file is larger than the edges' max file size
QUOTA_EXCEEDED = "quota_exceeded"  # the account's home would exceed its quota


class WireError(Exception):
    """A malformed or oversized frame: the connection is closed."""


def encode_frame(meta: dict[str, Any], data: bytes = b"") -> bytes:
    """Header and JSON of a frame (the caller sends `data` after it, avoiding a copy)."""
    body = json.dumps(meta, separators=(",", ":")).encode()
    if len(body) > MAX_META or len(data) > MAX_DATA:
        raise WireError("frame too large")
    return HEADER.pack(len(body), len(data)) + body


def decode_header(header: bytes) -> tuple[int, int]:
    meta_len, data_len = HEADER.unpack(header)
    if meta_len > MAX_META or data_len > MAX_DATA:
        raise WireError(f"frame too large ({meta_len} + {data_len} bytes)")
    return meta_len, data_len


def decode_meta(body: bytes) -> dict[str, Any]:
    try:
        meta = json.loads(body)
    except ValueError as exc:
        raise WireError(f"invalid JSON in frame: {exc}") from exc
    if not isinstance(meta, dict):
        raise WireError("a frame's JSON must be an object")
    return meta


def set_keepalive(sock: socket.socket, idle: int = 5, interval: int = 2, count: int = 3) -> None:
    """Notice a silently dead peer within ~idle + interval * count seconds."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", idle),
        ("TCP_KEEPINTVL", interval),
        ("TCP_KEEPCNT", count),
    ):
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class BlockingFrames:
    """Frames over a blocking socket (the transaction manager's side)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader = sock.makefile("rb", buffering=1 << 16)

    def _exactly(self, size: int) -> bytes:
        data = self._reader.read(size) if size else b""
        if len(data) != size:
            raise EOFError("connection closed")
        return data

    def read(self) -> tuple[dict[str, Any], bytes]:
        """The next frame; EOFError when the peer closed the connection."""
        meta_len, data_len = decode_header(self._exactly(HEADER.size))
        meta = decode_meta(self._exactly(meta_len))
        return meta, self._exactly(data_len)

    def write(self, meta: dict[str, Any], data: bytes = b"") -> None:
        head = encode_frame(meta, data)
        if len(data) < 65536:
            self.sock.sendall(head + data)  # one segment for answers and small chunks
        else:
            self.sock.sendall(head)
            self.sock.sendall(data)

    def close(self) -> None:
        try:
            self._reader.close()
        finally:
            self.sock.close()
