"""The transaction manager's side of the edge proxies: it dials out to every edge and serves
partner sessions over those connections (the edge never connects into the secure zone).

How it works (the wire format is in `ferrylink.edge_wire`):

- For each configured edge (`FERRYLINK_EDGES`, `host:port` of the edge's tunnel listener),
  a maintainer thread keeps `FERRYLINK_EDGE_IDLE_CONNECTIONS` idle TCP connections open,
  each introduced by a hello with this node's id and the shared secret.
- The edge hands one idle connection to each new partner session (an SSH connection or one
  HTTPS request). The first request on a connection makes it busy: the maintainer dials a
  replacement at once, and a thread here serves the session until the connection closes.
  Connections are used for one session only.
- Only a TM that should take new work offers connections: one that runs the shared event
  queue (every live server in `active_active`, the primary in `passive`), or the primary
  in `passive_legacy`. When it stops qualifying, its idle connections are closed; sessions
  already running finish.
- A session logs in first (password, public key or a session token; the same check as the
  TM's own API), then works inside the account's home: stat, list, open/read/write/close,
  remove, rename, mkdir, rmdir. Uploads are written to a hidden temporary file and appear
  under their name only when the partner closed them (then RECEIVED is logged and the
  `file.arrived` event is published, confirmed, before the partner is told it worked). An
  upload cut off before its close is kept as `.NAME.partial`: `stat NAME` reports its size
  and an append-open (OpenSSH's `reput`) continues it; it is never routed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import stat as stat_module
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from opentelemetry import trace
from sqlmodel import Session

from ferrylink.contracts import FileArrived
from ferrylink.edge_wire import (
    AUTH_FAILED,
    BAD_REQUEST,
    FAILURE,
    LOGIN_BANNED,
    NO_SUCH_FILE,
    PERMISSION_DENIED,
    PROTOCOL_VERSION,
    QUOTA_EXCEEDED,
    TOO_LARGE,
    BlockingFrames,
    WireError,
    set_keepalive,
)
from ferrylink.login_guard import LoginRefused
from ferrylink.paths import PathError, confined, relative_to
from ferrylink.tables.accounts import Account
from ferrylink.tables.transfers import EdgeLimits
from ferrylink.telemetry import extract_context, tracer
from services.transaction_manager.api import TransactionManager
from services.transaction_manager.api.edge_limits import read_edge_limits
from services.transaction_manager.logins import check_token, issue_token, verify_login
from services.transaction_manager.transfer_log import FAILED, RECEIVED, RECEIVING

log = logging.getLogger(__name__)

# Hidden names of unfinished uploads: never listed, never routed.
UNFINISHED = re.compile(r"^\..+\.(part|partial)$")
MAX_READ = 1 << 20


class SessionError(Exception):
    """Answered to the edge as `{"ok": false, "code", "error"}`; the session goes on."""

    def __init__(self, code: str, message: str, **details: Any) -> None:
        super().__init__(message)
        self.code = code
        self.details = details  # more fields of the answer (e.g. `retry_after`)


def partial_name(target: Path) -> Path:
    return target.with_name(f".{target.name}.partial")


@dataclass
class OpenFile:
    path: Path
    stream: BinaryIO
    writing: bool
    relative: str = ""
    temporary: Path | None = None
    position: int = 0
    digest: Any = None  # sha256 while the writes come in order, else None (computed at close)
    event: FileArrived | None = None
    error: str | None = None
    error_code: str = FAILURE
    # The most bytes this upload may hold (the edges' max file size, the account's quota).
    max_bytes: int | None = None
    limit_code: str = TOO_LARGE
    limit_message: str = ""


@dataclass
class EdgeSession:
    """One partner session, served on its own thread over one edge connection."""

    tm: TransactionManager
    frames: BlockingFrames
    edge: str
    token_lifetime: float
    account: str | None = None
    home: Path | None = None
    client_address: str = "?"
    protocol: str = "sftp"
    files: dict[int, OpenFile] = field(default_factory=dict)
    next_handle: int = 1
    limits: EdgeLimits = field(default_factory=EdgeLimits)

    def run(self, first: tuple[dict[str, Any], bytes]) -> None:
        request: tuple[dict[str, Any], bytes] | None = first
        try:
            while True:
                if request is None:
                    request = self.frames.read()
                meta, data = request
                request = None
                self._handle(meta, data)
        except (EOFError, OSError, WireError) as exc:
            if not isinstance(exc, EOFError):
                log.info("edge %s session of %s ended: %s", self.edge, self.account, exc)
        finally:
            self._abandon_open_files()
            self.frames.close()

    def _handle(self, meta: dict[str, Any], data: bytes) -> None:
        op = str(meta.get("op", ""))
        if "traceparent" not in meta or op == "write":
            self._handle_op(op, meta, data)
            return
        # The edge's request carries its trace: the session's work continues it (one
        # upload is one trace from the edge to delivery).
        with tracer().start_as_current_span(
            f"edge {op}", context=extract_context(meta), kind=trace.SpanKind.SERVER,
            attributes={"ferrylink.edge": self.edge, "ferrylink.protocol": self.protocol,
                        "ferrylink.edge.op": op},
        ):  # fmt: skip
            self._handle_op(op, meta, data)

    def _handle_op(self, op: str, meta: dict[str, Any], data: bytes) -> None:
        try:
            handler = getattr(self, f"op_{op}", None)
            if handler is None:
                raise SessionError(BAD_REQUEST, f"unknown operation {op!r}")
            if op != "login" and self.home is None:
                raise SessionError(AUTH_FAILED, "log in first")
            answer, payload = handler(meta, data)
        except SessionError as exc:
            answer = {**exc.details, "ok": False, "code": exc.code, "error": str(exc)}
            payload = b""
        except PathError as exc:
            answer, payload = {"ok": False, "code": PERMISSION_DENIED, "error": str(exc)}, b""
        except FileNotFoundError:
            answer = {"ok": False, "code": NO_SUCH_FILE, "error": "no such file or folder"}
            payload = b""
        except PermissionError:
            answer, payload = {"ok": False, "code": PERMISSION_DENIED, "error": "not allowed"}, b""
        except OSError as exc:
            answer, payload = {"ok": False, "code": FAILURE, "error": exc.strerror or str(exc)}, b""
        if meta.get("noreply"):
            return
        answer.setdefault("ok", True)
        answer["id"] = meta.get("id")
        self.frames.write(answer, payload)

    # -- login --------------------------------------------------------------------------------

    def op_login(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        if self.home is not None:
            raise SessionError(BAD_REQUEST, "already logged in")
        name = str(meta.get("account", ""))
        self.client_address = str(meta.get("client_address", "?"))
        self.protocol = str(meta.get("protocol", "sftp"))
        with Session(self.tm.runtime.engine) as session:
            found: Account | None
            if meta.get("token"):
                owner = check_token(session, str(meta["token"]))
                found = session.get(Account, owner) if owner else None
                if found is not None and not found.enabled:
                    found = None
            else:
                found = self._verify(session, name, meta)
            if found is None:
                raise SessionError(AUTH_FAILED, "authentication failed")
            home = confined(self.tm.data_dir, found.home)
            self.account = found.name
            # Read at each login: a change applies to every new session on every edge.
            self.limits = read_edge_limits(session)
        home.mkdir(parents=True, exist_ok=True)
        self.home = home
        limits = self.limits
        return {
            "account": self.account,
            "limits": {
                "sessions_per_account": limits.sessions_per_account,
                "idle_timeout_s": limits.idle_timeout_s,
            },
        }, b""

    def _verify(self, session: Session, name: str, meta: dict[str, Any]) -> Account | None:
        """A password or key login behind this process's failed-login defender, keyed by the
        partner's own address (the edge passes it; its own address would ban everyone)."""
        guard = self.tm.runtime.login_guard
        try:
            guard.check(self.client_address, name)
        except LoginRefused as exc:
            raise SessionError(
                LOGIN_BANNED,
                f"too many failed logins; try again in {exc.retry_after:.0f} s",
                retry_after=round(exc.retry_after),
            ) from None
        password = meta.get("password")
        found = verify_login(session, name, self.client_address, self.protocol,
                             password=password, public_key=meta.get("public_key"))  # fmt: skip
        if found is None and password is not None:
            # Only password failures count: an SSH client asks about each of its keys first.
            time.sleep(guard.failed(self.client_address, name))
        elif found is not None:
            guard.succeeded(self.client_address, name)
        return found

    def op_issue_token(self, _meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        assert self.account is not None
        with Session(self.tm.runtime.engine) as session:
            token = issue_token(session, self.account, self.token_lifetime)
        return {"token": token, "expires_in": int(self.token_lifetime)}, b""

    # -- paths --------------------------------------------------------------------------------

    def _path(self, meta: dict[str, Any], key: str = "path") -> Path:
        assert self.home is not None
        return confined(self.home, str(meta.get(key, "")))

    def _attrs(self, path: Path, follow: bool = True) -> dict[str, Any]:
        info = path.stat() if follow else path.lstat()
        return {
            "size": info.st_size,
            "mode": info.st_mode,
            "mtime": int(info.st_mtime),
            "atime": int(info.st_atime),
            "is_dir": stat_module.S_ISDIR(info.st_mode),
        }

    def op_stat(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        path = self._path(meta)
        if not path.exists() and partial_name(path).exists():
            # An interrupted upload: its size is what `reput` continues from.
            return {"attrs": self._attrs(partial_name(path))}, b""
        if not path.exists():
            raise SessionError(NO_SUCH_FILE, f"no such file: {meta.get('path')}")
        return {"attrs": self._attrs(path)}, b""

    def op_list(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        folder = self._path(meta)
        if not folder.is_dir():
            raise SessionError(NO_SUCH_FILE, f"no such folder: {meta.get('path')}")
        entries = []
        with os.scandir(folder) as found:
            for entry in found:
                if UNFINISHED.match(entry.name):
                    continue
                info = entry.stat(follow_symlinks=False)
                entries.append(
                    {
                        "name": entry.name,
                        "size": info.st_size,
                        "mode": info.st_mode,
                        "mtime": int(info.st_mtime),
                        "atime": int(info.st_atime),
                        "is_dir": stat_module.S_ISDIR(info.st_mode),
                    }
                )
        entries.sort(key=lambda e: str(e["name"]))
        return {"entries": entries}, b""

    def op_mkdir(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        path = self._path(meta)
        if path.exists():
            raise SessionError(FAILURE, f"{meta.get('path')} exists")
        path.mkdir(parents=bool(meta.get("parents")))
        return {}, b""

    def op_rmdir(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        path = self._path(meta)
        if path == self.home:
            raise SessionError(PERMISSION_DENIED, "the home folder cannot be removed")
        path.rmdir()
        return {}, b""

    def op_remove(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        path = self._path(meta)
        if path.is_dir():
            raise SessionError(FAILURE, f"{meta.get('path')} is a folder")
        if not path.exists() and partial_name(path).exists():
            partial_name(path).unlink()
            return {}, b""
        path.unlink()
        return {}, b""

    def op_rename(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        source, target = self._path(meta, "old"), self._path(meta, "new")
        if source == self.home:
            raise SessionError(PERMISSION_DENIED, "the home folder cannot be renamed")
        if not source.exists():
            raise SessionError(NO_SUCH_FILE, f"no such file: {meta.get('old')}")
        if target.exists() and not meta.get("overwrite"):
            raise SessionError(FAILURE, f"{meta.get('new')} exists")
        os.replace(source, target)
        return {}, b""

    def op_setstat(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        # Modes and times are the platform's business; accepted so `put -p` does not fail.
        if not self._path(meta).exists():
            raise SessionError(NO_SUCH_FILE, f"no such file: {meta.get('path')}")
        return {}, b""

    # -- files --------------------------------------------------------------------------------

    def _file(self, meta: dict[str, Any]) -> OpenFile:
        handle = self.files.get(int(meta.get("handle", 0)))
        if handle is None:
            raise SessionError(BAD_REQUEST, "unknown file handle")
        return handle

    def op_open(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        assert self.home is not None
        path = self._path(meta)
        if meta.get("mode") == "read":
            if not path.is_file():
                raise SessionError(NO_SUCH_FILE, f"no such file: {meta.get('path')}")
            opened = OpenFile(path, path.open("rb"), writing=False)
        else:
            opened = self._open_for_writing(path, meta)
        handle = self.next_handle
        self.next_handle += 1
        self.files[handle] = opened
        if opened.max_bytes is None:
            return {"handle": handle}, b""
        # The edge stops the client at the limit itself (it still forwards the write that
        # crosses it, so this side fails the upload too).
        limit = {"max_bytes": opened.max_bytes, "code": opened.limit_code,
                 "error": opened.limit_message}  # fmt: skip
        return {"handle": handle, "limit": limit}, b""

    def _open_for_writing(self, target: Path, meta: dict[str, Any]) -> OpenFile:
        assert self.home is not None and self.account is not None
        if target == self.home or target.is_dir() or str(meta.get("path", "")).endswith("/"):
            raise SessionError(BAD_REQUEST, "give a file name, not a folder")
        if meta.get("exclusive") and target.exists():
            raise SessionError(FAILURE, f"{meta.get('path')} exists")
        if meta.get("make_parents"):
            target.parent.mkdir(parents=True, exist_ok=True)
        elif not target.parent.is_dir():
            raise SessionError(NO_SUCH_FILE, f"no such folder for {meta.get('path')}")
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
        resumed = False
        if meta.get("append"):
            # Claim the interrupted upload by renaming it (atomic: one session wins).
            with contextlib.suppress(FileNotFoundError):
                os.rename(partial_name(target), temporary)
                resumed = True
            if not resumed and target.is_file():
                shutil.copyfile(target, temporary)
                resumed = True
        max_bytes, limit_code, limit_message = self._upload_limit(target)
        stream: BinaryIO = temporary.open("r+b" if resumed else "wb")
        digest = hashlib.sha256()
        position = 0
        if resumed:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
                position += len(chunk)
        relative = relative_to(self.home, target)
        event = FileArrived(account=self.account, path=relative, protocol=self.protocol)
        self._record(
            event,
            RECEIVING,
            file_name=relative,
            leg="receive",
            direction="inbound",
            protocol=self.protocol,
        )
        return OpenFile(
            target,
            stream,
            writing=True,
            relative=relative,
            temporary=temporary,
            position=position,
            digest=digest,
            event=event,
            max_bytes=max_bytes,
            limit_code=limit_code,
            limit_message=limit_message,
        )

    def _upload_limit(self, target: Path) -> tuple[int | None, str, str]:
        """(the most bytes this upload may hold or None, the error code, the message)."""
        assert self.home is not None
        found: list[tuple[int, str, str]] = []
        if self.limits.max_file_bytes:
            size = self.limits.max_file_bytes
            found.append((size, TOO_LARGE, f"the file is larger than the maximum of {size} bytes"))
        if self.limits.quota_bytes:
            # The file being replaced (or continued) frees its own bytes. Concurrent uploads
            # of one account are each checked against the usage at their open.
            replaced = target.stat().st_size if target.is_file() else 0
            with contextlib.suppress(FileNotFoundError):
                replaced = max(replaced, partial_name(target).stat().st_size)
            room = max(0, self.limits.quota_bytes - (_usage(self.home) - replaced))
            message = f"the account's quota of {self.limits.quota_bytes} bytes would be exceeded"
            found.append((room, QUOTA_EXCEEDED, message))
        if not found:
            return None, TOO_LARGE, ""
        return min(found)

    def op_write(self, meta: dict[str, Any], data: bytes) -> tuple[dict[str, Any], bytes]:
        opened = self._file(meta)
        if not opened.writing or opened.error:
            return {}, b""
        offset = int(meta.get("offset", 0))
        if opened.max_bytes is not None and offset + len(data) > opened.max_bytes:
            # Nothing more is written; the close fails and the upload is discarded.
            opened.error, opened.error_code = opened.limit_message, opened.limit_code
            return {}, b""
        try:
            if offset != opened.position:
                opened.stream.seek(offset)
                opened.digest = None  # out of order: hash the whole file at close
            opened.stream.write(data)
            opened.position = offset + len(data)
        except OSError as exc:
            opened.error = exc.strerror or str(exc)
        return {}, b""

    def op_read(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        opened = self._file(meta)
        size = min(int(meta.get("size", 0)), MAX_READ)
        return {}, os.pread(opened.stream.fileno(), size, int(meta.get("offset", 0)))

    def op_fstat(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        opened = self._file(meta)
        opened.stream.flush()
        info = os.fstat(opened.stream.fileno())
        return {
            "attrs": {
                "size": info.st_size,
                "mode": info.st_mode,
                "mtime": int(info.st_mtime),
                "atime": int(info.st_atime),
                "is_dir": False,
            }
        }, b""

    def op_close(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        opened = self._file(meta)
        del self.files[int(meta["handle"])]
        if not opened.writing:
            opened.stream.close()
            return {}, b""
        assert opened.temporary is not None and opened.event is not None
        event = opened.event
        try:
            if opened.error:
                raise OSError(opened.error)
            opened.stream.flush()
            os.fsync(opened.stream.fileno())
            size = os.fstat(opened.stream.fileno()).st_size
            opened.stream.close()
            checksum = opened.digest.hexdigest() if opened.digest else _sha256(opened.temporary)
            os.replace(opened.temporary, opened.path)
        except OSError as exc:
            opened.stream.close()
            opened.temporary.unlink(missing_ok=True)
            self._record(event, FAILED, detail=f"upload failed: {exc}")
            raise SessionError(opened.error_code, f"upload failed: {exc}") from exc
        # The file is complete under its name; the partner hears "done" only once the event
        # is confirmed by the broker.
        event.size = size
        event.checksum = checksum
        self._record(event, RECEIVED, bytes=size)
        self.tm.runtime.publish(event).result(30)
        log.info(
            "received %s/%s (%d bytes) over %s via edge %s from %s",
            self.account,
            opened.relative,
            size,
            self.protocol,
            self.edge,
            self.client_address,
        )
        return {"bytes": size, "event_id": event.id}, b""

    def op_abandon(self, meta: dict[str, Any], _data: bytes) -> tuple[dict[str, Any], bytes]:
        """The client went away without closing this upload: keep it as a partial."""
        opened = self._file(meta)
        del self.files[int(meta["handle"])]
        self._abandon(opened)
        return {}, b""

    def _abandon_open_files(self) -> None:
        """The session ended without closing its uploads: keep each as a resumable partial."""
        for opened in self.files.values():
            self._abandon(opened)
        self.files.clear()

    def _abandon(self, opened: OpenFile) -> None:
        with contextlib.suppress(OSError):
            opened.stream.close()
        if opened.writing and opened.temporary is not None and opened.event is not None:
            refused = opened.error_code in (TOO_LARGE, QUOTA_EXCEEDED)
            with contextlib.suppress(OSError):
                if refused:  # over a limit: nothing to resume
                    opened.temporary.unlink()
                else:
                    os.replace(opened.temporary, partial_name(opened.path))
            with contextlib.suppress(Exception):
                detail = (
                    f"upload refused: {opened.error}"
                    if refused
                    else "upload interrupted; resume it or upload again"
                )
                self._record(opened.event, FAILED, detail=detail)

    def _record(self, event: FileArrived, status: str, **fields: Any) -> None:
        with Session(self.tm.runtime.engine) as session:
            self.tm.transfer_log.record(
                session,
                f"{event.id}:receive",
                status,
                cycle_id=event.cycle_id,
                event_id=event.id,
                account=event.account,
                **fields,
            )


def _usage(home: Path) -> int:
    """Bytes of every file in an account's home (unfinished uploads included)."""
    total = 0
    for folder, _dirs, files in os.walk(home):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(folder, name)).st_size
    return total


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Keeping idle connections open to every edge
# --------------------------------------------------------------------------------------------


@dataclass
class _EdgeConnections:
    address: tuple[str, int]
    idle: set[socket.socket] = field(default_factory=set)
    busy: int = 0
    failures: int = 0
    name: str = ""


class EdgeLink:
    """Dials out to the edges and serves the sessions they hand over."""

    def __init__(
        self,
        tm: TransactionManager,
        edges: list[str],
        secret: str,
        offering: Callable[[], bool],
        idle_connections: int = 4,
        token_lifetime: float = 3600.0,
    ) -> None:
        self.tm = tm
        self.secret = secret
        self.offering = offering
        self.idle_target = idle_connections
        self.token_lifetime = token_lifetime
        self.edges = [_EdgeConnections(_address(e)) for e in edges]
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        if not self.edges:
            return
        if not self.secret:
            log.error("FERRYLINK_EDGES is set but FERRYLINK_EDGE_SECRET is empty: not dialling")
            return
        for edge in self.edges:
            thread = threading.Thread(
                target=self._maintain,
                args=(edge,),
                daemon=True,
                name=f"edge-link-{edge.address[1]}",
            )
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for edge in self.edges:
            self._close_idle(edge)

    def status(self) -> list[dict[str, Any]]:
        with self._lock:
            return [
                {
                    "edge": e.name or f"{e.address[0]}:{e.address[1]}",
                    "idle": len(e.idle),
                    "sessions": e.busy,
                }
                for e in self.edges
            ]

    def _close_idle(self, edge: _EdgeConnections) -> None:
        with self._lock:
            idle = list(edge.idle)
        for sock in idle:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _maintain(self, edge: _EdgeConnections) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                offering = self.offering()
            except Exception:
                log.exception("cannot tell whether to offer sessions")
                offering = False
            if not offering:
                self._close_idle(edge)
                self._wake.wait(0.5)
                continue
            with self._lock:
                missing = self.idle_target - len(edge.idle)
            if missing <= 0:
                self._wake.wait(0.5)
                continue
            try:
                self._dial(edge)
                edge.failures = 0
            except (OSError, WireError, EOFError) as exc:
                edge.failures += 1
                if edge.failures in (1, 10) or edge.failures % 100 == 0:
                    log.warning("cannot reach edge %s:%s: %s", *edge.address, exc)
                self._stop.wait(min(5.0, 0.2 * edge.failures))

    def _dial(self, edge: _EdgeConnections) -> None:
        sock = socket.create_connection(edge.address, timeout=5)
        try:
            set_keepalive(sock)
            frames = BlockingFrames(sock)
            frames.write(
                {
                    "op": "hello",
                    "version": PROTOCOL_VERSION,
                    "node": self.tm.runtime.settings.node_id,
                    "secret": self.secret,
                }
            )
            welcome, _ = frames.read()
            if not welcome.get("ok"):
                raise WireError(f"edge refused this server: {welcome.get('error')}")
            edge.name = str(welcome.get("edge", ""))
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        with self._lock:
            edge.idle.add(sock)
        threading.Thread(
            target=self._serve,
            args=(edge, sock, frames),
            daemon=True,
            name=f"edge-session-{edge.address[1]}",
        ).start()

    def _serve(self, edge: _EdgeConnections, sock: socket.socket, frames: BlockingFrames) -> None:
        try:
            first = frames.read()
        except (EOFError, OSError, WireError):
            with self._lock:
                edge.idle.discard(sock)
            self._wake.set()
            frames.close()
            return
        with self._lock:
            edge.idle.discard(sock)
            edge.busy += 1
        self._wake.set()  # dial a replacement at once
        try:
            EdgeSession(self.tm, frames, edge.name, self.token_lifetime).run(first)
        except Exception:
            log.exception("edge session failed")
        finally:
            with self._lock:
                edge.busy -= 1


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"edge address {text!r}: use host:port")
    return host.strip("[]"), int(port)


def offers_sessions(status: dict[str, Any], active: set[str], mode: str | None, node: str) -> bool:
    """Whether this TM should take new partner sessions (see the module docstring)."""
    from ferrylink.cluster import WORK_EVENTS, WORK_EVENTS_LOCAL

    if mode == "passive_legacy":
        return WORK_EVENTS_LOCAL in active and status.get("primary") == node
    return WORK_EVENTS in active
