"""The partner-facing SFTP server (asyncssh): every login and file operation is forwarded
to the backend server that took the session; nothing is stored here.

Paths are the account's view: `/` is its home. The edge only normalises paths for
`realpath` (what `cd` shows); the backend confines every path to the home and refuses `..`,
absolute escapes and symlinks leading out, with a message (SFTP status "permission denied").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
from asyncssh import (
    FXF_APPEND,
    FXF_EXCL,
    FXF_TRUNC,
    FXF_WRITE,
    SFTPAttrs,
    SFTPError,
    SFTPFailure,
    SFTPName,
    SFTPNoSuchFile,
    SFTPOpUnsupported,
    SFTPPermissionDenied,
)

from ferrylink.edge_wire import AUTH_FAILED, NO_SUCH_FILE, PERMISSION_DENIED
from services.edge_proxy.backends import (
    BackendConnection,
    BackendGone,
    BackendHub,
    BackendRefused,
    LoginBanned,
    NoBackend,
    TooManySessions,
)

log = logging.getLogger(__name__)
DISC_BY_APPLICATION = 11
# Channel flow control offered to clients. OpenSSH's `sftp` sends 32 KiB writes, each a little
# over 32 KiB with its header: with asyncssh's default 32 KiB packets every write took two
# SSH packets (one of ~50 bytes), each decrypted and dispatched on its own. Larger packets
# carry several writes at once (measured with `python -m bench edge`: about 15 % less CPU
# per GB); a larger window keeps the client's 64 requests in flight.
CHANNEL_MAX_PACKET = 128 * 1024
CHANNEL_WINDOW = 8 * 1024 * 1024


class EdgeSSHServer(asyncssh.SSHServer):
    """One partner SSH connection: its login and the backend connection it runs on."""

    def __init__(self, hub: BackendHub) -> None:
        self.hub = hub
        self.conn: asyncssh.SSHServerConnection | None = None
        self.client_address = "?"
        self.backend: BackendConnection | None = None
        self.account: str | None = None
        self._accepted_key: tuple[str, str] | None = None
        self.last_activity = 0.0
        self._idle_watch: asyncio.Task[None] | None = None
        self.sftp: EdgeSFTPServer | None = None  # the session's SFTP server, once started

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername")
        self.client_address = str(peer[0]) if peer else "?"

    def connection_lost(self, exc: Exception | None) -> None:
        if self.account is not None:
            self.hub.leave(self.account)
        if self._idle_watch is not None:
            self._idle_watch.cancel()
        if self.backend is not None:
            # Forget it first: releasing closes it, which must not read as the backend lost.
            backend, self.backend = self.backend, None
            self.hub.release(backend)

    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        return await self._login(username, {"password": password})

    async def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        line = key.export_public_key("openssh").decode().strip()
        # asyncssh asks twice for one key (the query, then with the signature it verifies).
        if self._accepted_key is not None:
            return self._accepted_key == (username, line)
        if await self._login(username, {"public_key": line}):
            self._accepted_key = (username, line)
            return True
        return False

    async def _login(self, username: str, secret: dict[str, Any]) -> bool:
        if self.account is not None:
            return False  # one account per connection
        credentials = {"account": username, "client_address": self.client_address,
                       "protocol": "sftp", **secret}  # fmt: skip
        try:
            backend, answer = await self.hub.login(credentials, self.backend)
        except NoBackend as exc:
            log.warning("SFTP login of %r from %s: %s", username, self.client_address, exc)
            if self.conn is not None:
                self.conn.disconnect(asyncssh.DISC_SERVICE_NOT_AVAILABLE, str(exc))
            return False
        except LoginBanned as exc:
            log.warning("SFTP login of %r from %s refused: %s", username,
                        self.client_address, exc)  # fmt: skip
            if self.conn is not None:  # said now: the client would only see "Permission denied"
                self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, str(exc))
            return False
        if self.backend is not backend:
            self.backend = backend
            backend.on_lost.append(self._backend_lost)
        if answer is None:
            return False
        limits: dict[str, Any] = answer.get("limits") or {}
        try:
            self.hub.admit(username, limits)
        except TooManySessions as exc:
            log.warning("SFTP session of %r from %s refused: %s", username,
                        self.client_address, exc)  # fmt: skip
            if self.conn is not None:
                self.conn.disconnect(asyncssh.DISC_TOO_MANY_CONNECTIONS, str(exc))
            return False
        self.account = username
        self.touch()
        idle_timeout = float(limits.get("idle_timeout_s") or 0)
        if idle_timeout:
            self._idle_watch = asyncio.create_task(self._watch_idle(idle_timeout))
        return True

    def touch(self) -> None:
        """A request from the client: the session is not idle."""
        self.last_activity = asyncio.get_running_loop().time()

    async def _watch_idle(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        while (left := self.last_activity + timeout - loop.time()) > 0:
            await asyncio.sleep(left)
        log.info("SFTP session of %s from %s idle for %g s: disconnecting",
                 self.account, self.client_address, timeout)  # fmt: skip
        self.end_session(f"no request for {timeout:g} s: session closed (idle timeout)")

    def end_session(self, reason: str) -> None:
        """Disconnect, telling the client why. The reason also goes to the SFTP channel's
        stderr first: OpenSSH closes the channel and exits before it reads the disconnect
        message that follows the channel close."""
        if self.sftp is not None:
            self.sftp.tell(reason)
        if self.conn is not None:
            self.conn.disconnect(DISC_BY_APPLICATION, reason)

    def _backend_lost(self, backend: BackendConnection) -> None:
        if backend is not self.backend or self.conn is None:
            return
        log.warning(
            "backend %s went away: ending the SFTP session of %s from %s",
            backend.node, self.account, self.client_address,
        )  # fmt: skip
        message = f"the server {backend.node} handling this session went away; please reconnect"
        # A moment for the failed request's own status to reach the client first.
        asyncio.get_running_loop().call_later(0.2, lambda: self.end_session(message))


@dataclass
class EdgeFile:
    handle: int
    path: str
    writing: bool
    max_bytes: int | None = None  # the edge limits' max file size or the account's quota
    limit_error: str = ""
    told: bool = False  # the client was told why this upload failed


def _text(path: bytes) -> str:
    try:
        return path.decode()
    except UnicodeDecodeError:
        raise SFTPFailure("file names must be UTF-8") from None


def _attrs(attrs: dict[str, Any]) -> SFTPAttrs:
    return SFTPAttrs(
        size=attrs.get("size"), permissions=attrs.get("mode"),
        atime=attrs.get("atime"), mtime=attrs.get("mtime"), uid=0, gid=0,
    )  # fmt: skip


def _sftp_error(exc: BackendRefused) -> SFTPError:
    if exc.code == NO_SUCH_FILE:
        return SFTPNoSuchFile(str(exc))
    if exc.code in (PERMISSION_DENIED, AUTH_FAILED):
        return SFTPPermissionDenied(str(exc))
    return SFTPFailure(str(exc))


class EdgeSFTPServer(asyncssh.SFTPServer):
    """The SFTP operations OpenSSH's `sftp` uses, each forwarded to the session's backend."""

    def __init__(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        super().__init__(chan)
        owner = chan.get_connection().get_owner()
        assert isinstance(owner, EdgeSSHServer)
        self.owner = owner
        owner.sftp = self
        self._told = ""

    def tell(self, message: str) -> None:
        """Show the client why a request failed: OpenSSH's `sftp` prints only the status
        code's generic text ("Failure"), but passes the channel's stderr through. The same
        message twice in a row (each pending request, then the session's end) is told once."""
        if message == self._told:
            return
        self._told = message
        with contextlib.suppress(Exception):
            self.channel.write_stderr(f"ferrylink: {message}\n".encode())

    def _gone(self, exc: BackendGone) -> SFTPFailure:
        """A request cut by its backend's loss: the client is told why at once (it may exit
        on the failed request, before the session's end tells it)."""
        self.tell(str(exc))
        return SFTPFailure(str(exc))

    async def _call(
        self, meta: dict[str, Any], data: bytes = b"", quiet: bool = False
    ) -> tuple[dict[str, Any], bytes]:
        backend = self.owner.backend
        if backend is None:
            raise SFTPFailure("not logged in")
        self.owner.touch()
        try:
            return await backend.request(meta, data)
        except BackendRefused as exc:
            # (A missing file is routine: `put` looks whether the target is a folder.)
            if not quiet and exc.code != NO_SUCH_FILE:
                self.tell(str(exc))
            raise _sftp_error(exc) from None
        except BackendGone as exc:
            raise self._gone(exc) from None

    # -- names ----------------------------------------------------------------------------------

    def format_user(self, uid: int | None) -> str:
        return self.owner.account or "partner"

    def format_group(self, gid: int | None) -> str:
        return "ferrylink"

    def realpath(self, path: bytes) -> bytes:
        normal = posixpath.normpath("/" + _text(path).lstrip("/"))
        return normal.encode()

    async def stat(self, path: bytes) -> SFTPAttrs:
        answer, _ = await self._call({"op": "stat", "path": _text(path)})
        return _attrs(answer["attrs"])

    async def lstat(self, path: bytes) -> SFTPAttrs:
        return await self.stat(path)

    async def scandir(self, path: bytes) -> AsyncIterator[SFTPName]:
        answer, _ = await self._call({"op": "list", "path": _text(path)})
        for entry in answer["entries"]:
            yield SFTPName(entry["name"].encode(), attrs=_attrs(entry))

    async def setstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._call({"op": "setstat", "path": _text(path)})

    async def lsetstat(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self.setstat(path, attrs)

    def fsetstat(self, file_obj: object, attrs: SFTPAttrs) -> None:
        return None  # modes and times are the platform's business

    # -- folders and names ----------------------------------------------------------------------

    async def mkdir(self, path: bytes, attrs: SFTPAttrs) -> None:
        await self._call({"op": "mkdir", "path": _text(path)})

    async def rmdir(self, path: bytes) -> None:
        await self._call({"op": "rmdir", "path": _text(path)})

    async def remove(self, path: bytes) -> None:
        await self._call({"op": "remove", "path": _text(path)})

    async def rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._call({"op": "rename", "old": _text(oldpath), "new": _text(newpath)})

    async def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        await self._call(
            {"op": "rename", "old": _text(oldpath), "new": _text(newpath), "overwrite": True}
        )

    # -- files ----------------------------------------------------------------------------------

    async def open(self, path: bytes, pflags: int, attrs: SFTPAttrs) -> EdgeFile:
        name = _text(path)
        writing = bool(pflags & FXF_WRITE)
        meta: dict[str, Any] = {"op": "open", "path": name, "mode": "write" if writing else "read"}
        if writing:
            # OpenSSH's `reput` opens with APPEND; a write-open without TRUNC keeps the data.
            meta["append"] = bool(pflags & FXF_APPEND) or not pflags & FXF_TRUNC
            meta["exclusive"] = bool(pflags & FXF_EXCL)
        answer, _ = await self._call(meta)
        limit = answer.get("limit") or {}
        return EdgeFile(int(answer["handle"]), name, writing, limit.get("max_bytes"),
                        str(limit.get("error", "")))  # fmt: skip

    async def read(self, file_obj: object, offset: int, size: int) -> bytes:
        assert isinstance(file_obj, EdgeFile)
        _, data = await self._call(
            {"op": "read", "handle": file_obj.handle, "offset": offset, "size": size}
        )
        return data

    async def write(self, file_obj: object, offset: int, data: bytes) -> int:
        assert isinstance(file_obj, EdgeFile)
        backend = self.owner.backend
        if backend is None:
            raise SFTPFailure("not logged in")
        self.owner.touch()
        try:
            # Not answered one by one: a failed write is reported by the close.
            await backend.send({"op": "write", "handle": file_obj.handle, "offset": offset}, data)
        except BackendGone as exc:
            raise self._gone(exc) from None
        if file_obj.max_bytes is not None and offset + len(data) > file_obj.max_bytes:
            # The backend refused this write too (and fails the close): stop the client now.
            if not file_obj.told:
                self.tell(file_obj.limit_error)
                file_obj.told = True
            raise SFTPFailure(file_obj.limit_error)
        return len(data)

    async def fstat(self, file_obj: object) -> SFTPAttrs:
        assert isinstance(file_obj, EdgeFile)
        answer, _ = await self._call({"op": "fstat", "handle": file_obj.handle})
        return _attrs(answer["attrs"])

    async def close(self, file_obj: object) -> None:
        assert isinstance(file_obj, EdgeFile)
        if file_obj.writing and self._client_gone():
            # asyncssh closes the open files when the session ends, too: an upload the
            # client never closed is incomplete, so the backend keeps it as a partial.
            await self._call({"op": "abandon", "handle": file_obj.handle})
            return
        await self._call({"op": "close", "handle": file_obj.handle}, quiet=file_obj.told)

    def _client_gone(self) -> bool:
        """True once the client sent EOF or the channel closed: a close now comes from the
        session's cleanup, not from the client. (asyncssh keeps this state private.)"""
        return getattr(self.channel, "_recv_state", "open") != "open" or self.channel.is_closing()

    # -- what a virtual file system does not offer ----------------------------------------------

    def readlink(self, path: bytes) -> bytes:
        raise SFTPOpUnsupported("links are not supported")

    def symlink(self, oldpath: bytes, newpath: bytes) -> None:
        raise SFTPOpUnsupported("links are not supported")

    def link(self, oldpath: bytes, newpath: bytes) -> None:
        raise SFTPOpUnsupported("links are not supported")

    def statvfs(self, path: bytes) -> asyncssh.SFTPVFSAttrs:
        raise SFTPOpUnsupported("statvfs is not supported")

    def fstatvfs(self, file_obj: object) -> asyncssh.SFTPVFSAttrs:
        raise SFTPOpUnsupported("statvfs is not supported")


async def start_sftp(
    hub: BackendHub, host: str, port: int, host_key: Path, login_timeout: float
) -> asyncssh.SSHAcceptor:
    return await asyncssh.create_server(
        lambda: EdgeSSHServer(hub),
        host,
        port,
        server_host_keys=[str(host_key)],
        sftp_factory=EdgeSFTPServer,
        allow_scp=False,
        login_timeout=login_timeout,
        keepalive_interval=30,
        keepalive_count_max=4,
        window=CHANNEL_WINDOW,
        max_pktsize=CHANNEL_MAX_PACKET,
    )
