"""A real SFTP server for tests: asyncssh on its own thread and event loop.

Tests exercise the partner client against the SSH protocol for real (key exchange, host key,
password and public-key auth, SFTP requests), so a bug in either side shows up here rather
than at a partner's site. The server listens on 127.0.0.1 on a free port, serves one
directory as a chroot and accepts one user.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncssh


def generate_client_key() -> tuple[str, str]:
    """A fresh ed25519 key pair as (OpenSSH private key text, "ssh-ed25519 AAAA..." line)."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    private_text = key.export_private_key("openssh").decode()
    public_line = key.export_public_key("openssh").decode().strip()
    return private_text, public_line


class _ChrootSFTPServer(asyncssh.SFTPServer):
    """asyncssh's chroot maps paths lexically; additionally refuse any path whose resolved
    location (following symlinks that already exist) lies outside the root."""

    def __init__(
        self, chan: asyncssh.SSHServerChannel, root: Path, posix_rename: bool = True
    ) -> None:
        super().__init__(chan, chroot=os.fsencode(root))
        self._real_root = os.fsencode(os.path.realpath(root))
        self._posix_rename = posix_rename

    def map_path(self, path: bytes) -> bytes:
        mapped = super().map_path(path)
        real = os.path.realpath(mapped)
        if real != self._real_root and not real.startswith(self._real_root + b"/"):
            raise asyncssh.SFTPPermissionDenied("path outside the served root")
        return mapped

    def posix_rename(self, oldpath: bytes, newpath: bytes) -> None:
        if not self._posix_rename:
            raise asyncssh.SFTPOpUnsupported("posix-rename disabled on this test server")
        super().posix_rename(oldpath, newpath)


class _Auth(asyncssh.SSHServer):
    """Accepts exactly one user, by password and/or one of the authorized public keys."""

    def __init__(self, owner: SftpServer) -> None:
        self._owner = owner

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._owner._connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner._connections = {c for c in self._owner._connections if not c.is_closed()}

    def begin_auth(self, username: str) -> bool:
        return True  # always require authentication

    def password_auth_supported(self) -> bool:
        return self._owner.password is not None

    def validate_password(self, username: str, password: str) -> bool:
        expected = self._owner.password
        return (
            expected is not None
            and username == self._owner.username
            and hmac.compare_digest(password.encode(), expected.encode())
        )

    def public_key_auth_supported(self) -> bool:
        return bool(self._owner.authorized_keys)

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        if username != self._owner.username:
            return False
        return any(key.public_data == k.public_data for k in self._owner.authorized_keys)


class SftpServer:
    """An SFTP-only server on 127.0.0.1 serving `root` (chrooted) to one user.

    Use as a context manager, or call start()/stop(). `host_key_line` is the server's public
    host key as it goes into `Partner.host_key`.
    """

    def __init__(
        self,
        root: Path,
        username: str = "partner",
        password: str | None = None,
        authorized_keys: list[str] | None = None,
        posix_rename: bool = True,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.username = username
        self.password = password
        self.authorized_keys = [asyncssh.import_public_key(k) for k in authorized_keys or []]
        # False makes the server answer posix-rename with "unsupported", like servers that
        # lack the extension, to exercise the client's remove + rename fallback.
        self.posix_rename = posix_rename
        self._host_key = asyncssh.generate_private_key("ssh-ed25519")
        self.host_key_line = self._host_key.export_public_key("openssh").decode().strip()
        self.port = 0
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def start(self) -> SftpServer:
        """Start listening; returns once the port is bound (or raises what went wrong)."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._thread = threading.Thread(target=self._run, name="test-sftp-server", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("SFTP server did not start within 10 s")
        if self._error is not None:
            self._thread.join(5)
            self._thread = None
            raise RuntimeError("SFTP server failed to start") from self._error
        return self

    def stop(self) -> None:
        """Close the listener and every open connection, then join the thread."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:
                pass  # the loop already finished
        thread.join(10)
        if thread.is_alive():
            raise RuntimeError("SFTP server thread did not stop")
        self._thread = None

    def __enter__(self) -> SftpServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - reported to start()
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        root, posix_rename = self.root, self.posix_rename
        acceptor = await asyncssh.listen(
            "127.0.0.1",
            0,
            server_factory=lambda: _Auth(self),
            server_host_keys=[self._host_key],
            sftp_factory=lambda chan: _ChrootSFTPServer(chan, root, posix_rename),
            allow_scp=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=False,
            login_timeout=10,
        )
        try:
            self.port = acceptor.sockets[0].getsockname()[1]
            self._ready.set()
            await self._stopping.wait()
        finally:
            acceptor.close()
            await acceptor.wait_closed()
            conns = list(self._connections)
            for conn in conns:
                conn.close()
            for conn in conns:
                try:
                    await asyncio.wait_for(conn.wait_closed(), 5)
                except Exception:
                    pass


@contextmanager
def sftp_server(
    root: Path,
    username: str = "partner",
    password: str | None = None,
    authorized_keys: list[str] | None = None,
    posix_rename: bool = True,
) -> Iterator[SftpServer]:
    """Context manager form, handy inside pytest fixtures."""
    server = SftpServer(root, username, password, authorized_keys, posix_rename)
    with server:
        yield server
