"""SFTP with a partner (asyncssh), for `partners`: imported on the first SFTP exchange, so a
transaction manager that runs none does not hold asyncssh and the parts of cryptography it
loads (~11 MB).

Each call runs its own short-lived event loop (`asyncio.run`) holding one SSH connection:
threads never share a loop or a connection, nothing keeps running between calls, and a
failed call cannot leave state behind that poisons the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import posixpath
import stat
from collections.abc import AsyncIterator, Awaitable, Coroutine, Iterator
from contextlib import asynccontextmanager
from typing import Any, BinaryIO, TypeVar, cast

import asyncssh

from ferrylink.tables.accounts import Partner
from services.transaction_manager.partners import PartnerError, RemoteFile, _fail, _short

T = TypeVar("T")

# SFTP data moves in blocks of _BLOCK bytes with up to _WINDOW blocks in flight (4 MiB, as
# asyncssh's own copier does): waiting a round trip per block would cripple long links, and
# the window bounds memory. A transfer fails when no block completes for `timeout` seconds.
_BLOCK = 256 * 1024
_WINDOW = 16

# SFTP status codes that describe the request or the remote tree, not a passing condition:
# trying again later gives the same answer.
_PERMANENT_SFTP_CODES = frozenset(
    {
        asyncssh.FX_NO_SUCH_FILE,
        asyncssh.FX_PERMISSION_DENIED,
        asyncssh.FX_OP_UNSUPPORTED,
        asyncssh.FX_INVALID_HANDLE,
        asyncssh.FX_NO_SUCH_PATH,
        asyncssh.FX_FILE_ALREADY_EXISTS,
        asyncssh.FX_WRITE_PROTECT,
        asyncssh.FX_UNKNOWN_PRINCIPAL,
        asyncssh.FX_DIR_NOT_EMPTY,
        asyncssh.FX_NOT_A_DIRECTORY,
        asyncssh.FX_INVALID_FILENAME,
        asyncssh.FX_LINK_LOOP,
        asyncssh.FX_CANNOT_DELETE,
        asyncssh.FX_INVALID_PARAMETER,
        asyncssh.FX_FILE_IS_A_DIRECTORY,
        asyncssh.FX_OWNER_INVALID,
        asyncssh.FX_GROUP_INVALID,
    }
)


def load_private_key(text: str, passphrase: str | None) -> asyncssh.SSHKey:
    """An OpenSSH or PEM private key, decrypted with `passphrase` if it is encrypted; a
    ValueError says why not (never quoting the key: the parser's message could)."""
    try:
        return asyncssh.import_private_key(text, passphrase or None)
    except (asyncssh.KeyImportError, asyncssh.KeyEncryptionError, ValueError) as exc:
        reason = str(exc).lower()
        if "passphrase must be specified" in reason:
            raise ValueError(
                "the private key is encrypted: give its passphrase (private_key_passphrase)"
            ) from None
        if passphrase and ("decrypt" in reason or "passphrase" in reason):
            raise ValueError("the private key does not decrypt with the given passphrase") from None
        raise ValueError(
            "the private key cannot be loaded (an OpenSSH or PEM private key, with its "
            "passphrase if encrypted)"
        ) from None


def ssh_options(partner: Partner) -> dict[str, Any]:
    """asyncssh connect options for the partner; configuration errors fail here, before any
    connection is made. Nothing from the local user's ~/.ssh (config, keys, agent, known
    hosts) is used: a partner is defined by its record alone."""
    if partner.protocol != "sftp":
        raise _fail(
            partner,
            f"protocol is {partner.protocol!r}; this operation needs an SFTP partner",
            False,
        )
    if not partner.host:
        raise _fail(partner, "no host configured", False)
    if not partner.username:
        raise _fail(partner, "no username configured", False)

    known_hosts: object
    if partner.check_host_key:
        line = (partner.host_key or "").strip()
        if not line:
            raise _fail(
                partner,
                "host key checking is on but no host key is configured: set host_key to the "
                "server's public key ('ssh-ed25519 AAAA...') or switch check_host_key off",
                False,
            )
        try:
            host_key = asyncssh.import_public_key(line)
        except (asyncssh.KeyImportError, ValueError):
            raise _fail(
                partner, "the configured host key is not a valid public key", False
            ) from None
        known_hosts = ([host_key], [], [])
    else:
        known_hosts = None  # explicitly off: asyncssh then accepts any host key

    client_keys: list[asyncssh.SSHKey] | None = None
    if partner.private_key:
        try:
            client_keys = [load_private_key(partner.private_key, partner.private_key_passphrase)]
        except ValueError as exc:
            raise _fail(partner, str(exc), False) from None
    if not client_keys and not partner.password:
        raise _fail(partner, "neither a password nor a private key is configured", False)

    return {
        "username": partner.username,
        "password": partner.password or None,
        "client_keys": client_keys,
        "known_hosts": known_hosts,
        "agent_path": None,
        "config": [],
        "gss_host": None,
        "x509_trusted_certs": None,
        "host_based_auth": False,
    }


def run(partner: Partner, action: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run one SFTP exchange on a private event loop and turn SSH failures into
    PartnerError. Only network-side exceptions are translated; local OSErrors propagate."""
    prefix = f"{action} failed: "
    try:
        return asyncio.run(coro)
    except PartnerError:
        raise
    except asyncssh.PermissionDenied:
        raise _fail(
            partner, f"{prefix}authentication failed for user {partner.username!r}", False
        ) from None
    except asyncssh.HostKeyNotVerifiable:
        raise _fail(
            partner,
            f"{prefix}the server's host key does not match the configured host key "
            "(nothing was sent)",
            False,
        ) from None
    except asyncssh.KeyExchangeFailed as exc:
        raise _fail(
            partner,
            f"{prefix}SSH key exchange failed ({_short(exc.reason)}); does the configured host "
            "key have the server's key type?",
            False,
        ) from None
    except (asyncssh.ProtocolNotSupported, asyncssh.IllegalUserName) as exc:
        raise _fail(partner, f"{prefix}{_short(exc.reason)}", False) from None
    except asyncssh.DisconnectError as exc:
        raise _fail(partner, f"{prefix}connection closed: {_short(exc.reason)}", True) from None
    except asyncssh.ChannelOpenError as exc:
        retry = exc.code == asyncssh.OPEN_RESOURCE_SHORTAGE
        raise _fail(
            partner, f"{prefix}server refused the SFTP session: {_short(exc.reason)}", retry
        ) from None
    except asyncssh.SFTPError as exc:
        retry = exc.code not in _PERMANENT_SFTP_CODES
        raise _fail(partner, f"{prefix}SFTP error: {_short(exc.reason)}", retry) from None
    except ConnectionError as exc:
        raise _fail(partner, f"{prefix}connection lost: {exc.strerror or exc}", True) from exc


async def _op(partner: Partner, aw: Awaitable[T], timeout: float, what: str) -> T:
    """Await one network step, bounded by `timeout`."""
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        raise _fail(partner, f"timed out after {timeout:g} s while {what}", True) from None


# --------------------------------------------------------------------------------------------
# SFTP
# --------------------------------------------------------------------------------------------


def _folder(partner: Partner) -> str:
    return partner.remote_folder or "/"


@asynccontextmanager
async def _sftp_session(
    partner: Partner, options: dict[str, Any], timeout: float
) -> AsyncIterator[asyncssh.SFTPClient]:
    """An SFTP client on a fresh connection, closed (or aborted if closing stalls) on exit."""
    where = f"{partner.host}:{partner.port}"
    try:
        conn = await asyncio.wait_for(
            asyncssh.connect(partner.host, partner.port, connect_timeout=timeout, **options),
            timeout,
        )
    except TimeoutError:
        raise _fail(partner, f"timed out after {timeout:g} s connecting to {where}", True) from None
    except OSError as exc:
        raise _fail(partner, f"cannot connect to {where}: {exc.strerror or exc}", True) from exc
    try:
        sftp = await _op(partner, conn.start_sftp_client(), timeout, "starting SFTP")
        yield sftp
    finally:
        conn.close()
        try:
            await asyncio.wait_for(conn.wait_closed(), min(timeout, 5))
        except TimeoutError:
            conn.abort()


async def _missing(
    partner: Partner, sftp: asyncssh.SFTPClient, name: str, timeout: float
) -> tuple[PartnerError, bool]:
    """The error for a 'no such file', saying whether the folder or only the file is
    missing; the flag is True when the file alone is missing."""
    folder = _folder(partner)
    try:
        folder_ok = await _op(partner, sftp.isdir(folder), timeout, "checking the remote folder")
    except asyncssh.SFTPError:
        folder_ok = False
    if not folder_ok:
        return _fail(
            partner, f"remote folder {folder!r} does not exist (or is not a folder)", False
        ), False
    return _fail(partner, f"remote file {name!r} not found in {folder!r}", False), True


async def _windowed(
    partner: Partner, jobs: Iterator[Awaitable[object]], timeout: float, what: str
) -> None:
    """Run `jobs` (taken lazily) with up to _WINDOW in flight; fail on the first error or when
    none completes for `timeout` seconds."""
    pending: set[asyncio.Future[object]] = set()
    try:
        for job in jobs:
            pending.add(asyncio.ensure_future(job))
            if len(pending) >= _WINDOW:
                pending = await _settle(partner, pending, timeout, what)
        while pending:
            pending = await _settle(partner, pending, timeout, what)
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _settle(
    partner: Partner, pending: set[asyncio.Future[object]], timeout: float, what: str
) -> set[asyncio.Future[object]]:
    """Wait for at least one job; return the ones still running."""
    done, rest = await asyncio.wait(pending, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    if not done:
        raise _fail(partner, f"timed out after {timeout:g} s without progress while {what}", True)
    errors = [exc for exc in (task.exception() for task in done) if exc is not None]
    if errors:
        raise errors[0]
    return rest


def _blocks(src: BinaryIO) -> Iterator[tuple[int, bytes]]:
    offset = 0
    while block := src.read(_BLOCK):
        yield offset, block
        offset += len(block)


async def push(
    partner: Partner, options: dict[str, Any], src: BinaryIO, name: str, timeout: float
) -> int:
    folder = _folder(partner)
    final = posixpath.join(folder, name)
    part = posixpath.join(folder, f".{name}.part")
    async with _sftp_session(partner, options, timeout) as sftp:
        try:
            remote = await _op(partner, sftp.open(part, "wb"), timeout, "opening the upload")
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
            raise (await _missing(partner, sftp, name, timeout))[0] from None
        sent = 0

        async def write(offset: int, block: bytes) -> None:
            nonlocal sent
            await remote.write(block, offset)
            sent += len(block)

        try:
            try:
                jobs = (write(offset, block) for offset, block in _blocks(src))
                await _windowed(partner, jobs, timeout, "uploading")
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(remote.close(), min(timeout, 5))
            stored = (await _op(partner, sftp.stat(part), timeout, "checking the upload")).size
            if stored != sent:
                raise _fail(partner, f"server stored {stored} of {sent} bytes of {name!r}", True)
            await _replace(partner, sftp, part, final, timeout)
        except Exception:
            # Best effort: the next push truncates the temporary file anyway.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(sftp.remove(part), min(timeout, 5))
            raise
    return sent


async def _replace(
    partner: Partner, sftp: asyncssh.SFTPClient, src: str, dst: str, timeout: float
) -> None:
    """Rename `src` onto `dst`, replacing it: atomically with posix-rename where the server
    has it, else remove + rename (a moment without `dst`, but never a partial `dst`)."""
    try:
        await _op(partner, sftp.posix_rename(src, dst), timeout, "renaming the upload")
        return
    except asyncssh.SFTPOpUnsupported:
        pass
    with contextlib.suppress(asyncssh.SFTPNoSuchFile):
        await _op(partner, sftp.remove(dst), timeout, "replacing the previous file")
    await _op(partner, sftp.rename(src, dst), timeout, "renaming the upload")


def _is_regular(attrs: asyncssh.SFTPAttrs) -> bool:
    if attrs.type != asyncssh.FILEXFER_TYPE_UNKNOWN:
        return attrs.type == asyncssh.FILEXFER_TYPE_REGULAR
    return attrs.permissions is not None and stat.S_ISREG(attrs.permissions)


def _mtime(attrs: asyncssh.SFTPAttrs) -> float:
    return float(attrs.mtime or 0) + (attrs.mtime_ns or 0) / 1e9


async def listing(
    partner: Partner, options: dict[str, Any], pattern: str, timeout: float
) -> list[RemoteFile]:
    folder = _folder(partner)
    async with _sftp_session(partner, options, timeout) as sftp:
        try:
            entries = await _op(partner, sftp.readdir(folder), timeout, "listing")
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath, asyncssh.SFTPNotADirectory):
            raise _fail(
                partner, f"remote folder {folder!r} does not exist (or is not a folder)", False
            ) from None
    found = [
        RemoteFile(str(entry.filename), entry.attrs.size or 0, _mtime(entry.attrs))
        for entry in entries
        if not str(entry.filename).startswith(".")
        and _is_regular(entry.attrs)
        and fnmatch.fnmatchcase(str(entry.filename), pattern)
    ]
    return sorted(found, key=lambda f: f.name)


async def pull(
    partner: Partner, options: dict[str, Any], name: str, dst: BinaryIO, timeout: float
) -> int:
    path = posixpath.join(_folder(partner), name)

    def changed() -> PartnerError:
        return _fail(partner, f"remote file {name!r} changed while being downloaded", True)

    async with _sftp_session(partner, options, timeout) as sftp:
        try:
            remote = await _op(partner, sftp.open(path, "rb"), timeout, "opening the file")
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
            raise (await _missing(partner, sftp, name, timeout))[0] from None

        async def read(offset: int, length: int) -> bytes:
            # Opened in binary mode, so reads return bytes.
            return cast(bytes, await remote.read(length, offset))

        async def fetch(offset: int, length: int) -> None:
            got = 0
            while got < length:  # servers may answer a read with fewer bytes
                data = await read(offset + got, length - got)
                if not data:
                    raise changed()  # it shrank
                dst.seek(offset + got)  # no await between seek and write: no interleaving
                dst.write(data)
                got += len(data)

        try:
            size = (await _op(partner, remote.stat(), timeout, "reading the size")).size
            if size is None:  # the server does not say: read sequentially to the end
                size = 0
                while data := await _op(partner, read(size, _BLOCK), timeout, "downloading"):
                    dst.write(data)
                    size += len(data)
            else:
                jobs = (fetch(o, min(_BLOCK, size - o)) for o in range(0, size, _BLOCK))
                await _windowed(partner, jobs, timeout, "downloading")
                if await _op(partner, read(size, 1), timeout, "downloading"):
                    raise changed()  # it grew
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(remote.close(), min(timeout, 5))
    return size


async def remove(
    partner: Partner, options: dict[str, Any], name: str, timeout: float, missing_ok: bool
) -> None:
    path = posixpath.join(_folder(partner), name)
    async with _sftp_session(partner, options, timeout) as sftp:
        try:
            await _op(partner, sftp.remove(path), timeout, "removing")
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
            error, only_file_missing = await _missing(partner, sftp, name, timeout)
            if not (missing_ok and only_file_missing):
                raise error from None


async def size(partner: Partner, options: dict[str, Any], name: str, timeout: float) -> int | None:
    path = posixpath.join(_folder(partner), name)
    async with _sftp_session(partner, options, timeout) as sftp:
        try:
            attrs = await _op(partner, sftp.stat(path), timeout, "checking a pushed file")
        except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPNoSuchPath):
            return None
        return int(attrs.size) if attrs.size is not None and _is_regular(attrs) else None
