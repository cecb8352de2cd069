"""Exchanging files with partners: push, list, pull and remove over SFTP or HTTP(S).

The transaction manager calls this from worker threads, so the API is synchronous. SFTP is
in `partner_sftp` (asyncssh) and HTTP(S) uses httpx, each imported on its first exchange: a
transaction manager that exchanges nothing holds neither. Each SFTP call holds its own SSH
connection; the cost (one SSH handshake per call) is small next to a file transfer.

Failures raise `PartnerError` whose `retryable` flag tells the caller whether trying again
later can help (network trouble, timeouts, server overload) or not (bad credentials, host key
mismatch, missing folder, rejected request). Errors of the local file system (a missing
`local_path`, a full local disk) are not partner errors and propagate as `OSError`.

`timeout` bounds every single network wait (connecting, authenticating, each request, the gap
between two data blocks), not the whole transfer: a large file on a slow but live link must
not fail, a stalled one must.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import secrets
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast
from urllib.parse import quote, urlsplit, urlunsplit

from ferrylink.secrets_box import SecretError, box
from ferrylink.tables.accounts import Partner

if TYPE_CHECKING:
    import asyncssh

log = logging.getLogger(__name__)

# HTTP statuses below 500 that still mean "not now" rather than "never".
_RETRYABLE_HTTP = frozenset({408, 425, 429})


class PartnerError(Exception):
    """A partner exchange failed; `retryable` says whether a later attempt can succeed.

    Messages name the partner and what failed, never a password or key material.
    """

    def __init__(self, message: str, *, retryable: bool, partner: str | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.partner = partner


@dataclass(frozen=True)
class RemoteFile:
    """A regular file in a partner's remote folder, as listed by `list_remote`."""

    name: str
    size: int
    mtime: float


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------

Fn = TypeVar("Fn", bound=Callable[..., Any])


def readable(partner: Partner) -> Partner:
    """A copy of the partner with its secrets decrypted (stored encrypted, ferrylink.secrets_box);
    the copy lives only for the transfer."""
    secrets_at_rest = box()
    try:
        return partner.model_copy(update={
            "password": secrets_at_rest.decrypt(partner.password),
            "private_key": secrets_at_rest.decrypt(partner.private_key),
            "private_key_passphrase": secrets_at_rest.decrypt(partner.private_key_passphrase),
        })  # fmt: skip
    except SecretError as exc:
        raise PartnerError(f"partner {partner.name!r}: {exc}", retryable=False,
                           partner=partner.name) from None  # fmt: skip


def _decrypted(function: Fn) -> Fn:
    @functools.wraps(function)
    def with_secrets(partner: Partner, *args: Any, **kwargs: Any) -> Any:
        return function(readable(partner), *args, **kwargs)

    return cast(Fn, with_secrets)


@_decrypted
def push_file(partner: Partner, local_path: Path, remote_name: str, timeout: float = 30) -> int:
    """Send `local_path` to the partner as `remote_name`; returns the bytes sent.

    SFTP: written to `.<remote_name>.part` in the remote folder, then renamed onto the final
    name, so the partner never sees a partial file under the final name and a repeated push
    replaces the file cleanly. HTTP(S): streamed as `PUT {url}/{remote_name}`.
    """
    _check_name(partner, remote_name)
    if partner.protocol == "http":
        return _push_http(partner, Path(local_path), remote_name, timeout)
    from services.transaction_manager import partner_sftp as sftp

    options = sftp.ssh_options(partner)  # refuses protocols other than sftp
    with Path(local_path).open("rb") as src:
        sent = sftp.run(
            partner,
            f"push of {remote_name!r}",
            sftp.push(partner, options, src, remote_name, timeout),
        )
    log.info("pushed %s to partner %s (%d bytes)", remote_name, partner.name, sent)
    return sent


@_decrypted
def list_remote(partner: Partner, pattern: str = "*", timeout: float = 30) -> list[RemoteFile]:
    """The regular files in the partner's remote folder whose names match `pattern` (fnmatch,
    case-sensitive), sorted by name. Names starting with '.' (temporary uploads) are skipped."""
    from services.transaction_manager import partner_sftp as sftp

    options = sftp.ssh_options(partner)
    return sftp.run(partner, "listing", sftp.listing(partner, options, pattern, timeout))


@_decrypted
def pull_file(partner: Partner, remote_name: str, local_path: Path, timeout: float = 30) -> int:
    """Fetch `remote_name` into `local_path`; returns the bytes received.

    The data goes to a temporary sibling of `local_path` that is renamed over it only once
    complete and flushed to disk, so `local_path` is either the old file or the whole new one.
    """
    _check_name(partner, remote_name)
    from services.transaction_manager import partner_sftp as sftp

    options = sftp.ssh_options(partner)
    local_path = Path(local_path)
    tmp = local_path.with_name(f".{local_path.name}.{secrets.token_hex(4)}.part")
    # O_EXCL: never write through a pre-existing file or link; mode 0o666 lets the umask decide.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
    try:
        with os.fdopen(fd, "wb") as dst:
            received = sftp.run(
                partner,
                f"pull of {remote_name!r}",
                sftp.pull(partner, options, remote_name, dst, timeout),
            )
            dst.flush()
            os.fsync(dst.fileno())
        os.replace(tmp, local_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(local_path.parent)
    log.info("pulled %s from partner %s (%d bytes)", remote_name, partner.name, received)
    return received


@_decrypted
def remote_size(partner: Partner, remote_name: str, timeout: float = 30) -> int | None:
    """The size of `remote_name` at the partner, None if it is not there: how a redelivered
    event recognises a push that completed before a crash (pushes land under their final name
    only once complete). HTTP asks with HEAD; a server without HEAD counts as "not there"."""
    _check_name(partner, remote_name)
    if partner.protocol == "http":
        return _size_http(partner, remote_name, timeout)
    from services.transaction_manager import partner_sftp as sftp

    options = sftp.ssh_options(partner)
    return sftp.run(partner, f"stat of {remote_name!r}",
                    sftp.size(partner, options, remote_name, timeout))  # fmt: skip


@_decrypted
def remove_remote(
    partner: Partner, remote_name: str, timeout: float = 30, missing_ok: bool = True
) -> None:
    """Delete `remote_name` from the partner's remote folder (delete after pull).

    A file that is already gone counts as removed by default, so repeating the step after a
    crash or a redelivered event is harmless.
    """
    _check_name(partner, remote_name)
    from services.transaction_manager import partner_sftp as sftp

    options = sftp.ssh_options(partner)
    sftp.run(
        partner,
        f"removal of {remote_name!r}",
        sftp.remove(partner, options, remote_name, timeout, missing_ok),
    )


# --------------------------------------------------------------------------------------------
# Validation and errors
# --------------------------------------------------------------------------------------------


def load_private_key(text: str, passphrase: str | None) -> asyncssh.SSHKey:
    """An OpenSSH or PEM private key, decrypted with `passphrase` if it is encrypted; a
    ValueError says why not (never quoting the key: the parser's message could)."""
    from services.transaction_manager import partner_sftp

    return partner_sftp.load_private_key(text, passphrase)


def _fail(partner: Partner, message: str, retryable: bool) -> PartnerError:
    """Build the error, with the password scrubbed out in case a server echoed it back."""
    text = f"partner {partner.name!r}: {message}"
    if partner.password:
        text = text.replace(partner.password, "***")
    return PartnerError(text, retryable=retryable, partner=partner.name)


def _short(reason: object) -> str:
    """Server-provided text, bounded so a hostile server cannot flood our logs."""
    text = str(reason).strip() or "no reason given"
    return text if len(text) <= 200 else text[:200] + "..."


def _check_name(partner: Partner, name: str) -> None:
    """Refuse names that could address anything but a file directly in the remote folder."""
    if (
        not name
        or name in (".", "..")
        or ".." in name
        or "/" in name
        or "\\" in name
        or "\0" in name
    ):
        raise _fail(
            partner,
            f"invalid remote file name {name!r}: it must be a plain name without "
            "'/', '\\\\', '..' or NUL",
            retryable=False,
        )


def _size_http(partner: Partner, name: str, timeout: float) -> int | None:
    import httpx

    target = f"{partner.url.strip().rstrip('/')}/{quote(name, safe='')}"
    auth = (
        httpx.BasicAuth(partner.username, partner.password)
        if partner.username and partner.password
        else None
    )
    try:
        with httpx.Client(auth=auth, verify=partner.verify_tls, timeout=timeout) as client:
            response = client.head(target)
    except httpx.TransportError as exc:
        raise _fail(partner, f"HEAD {_safe_url(target)} failed: {_short(exc)}", True) from exc
    if response.status_code == 200 and "content-length" in response.headers:
        return int(response.headers["content-length"])
    return None


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; not every platform or file system allows it, which is fine."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# --------------------------------------------------------------------------------------------
# HTTP(S)
# --------------------------------------------------------------------------------------------


def _safe_url(url: str) -> str:
    """The URL without credentials, query or fragment, fit for messages."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _tls_verify_failed(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _push_http(partner: Partner, local_path: Path, name: str, timeout: float) -> int:
    import httpx

    base = partner.url.strip().rstrip("/")
    if not base:
        raise _fail(partner, "no url configured", False)
    target = f"{base}/{quote(name, safe='')}"
    shown = _safe_url(target)
    auth = (
        httpx.BasicAuth(partner.username, partner.password)
        if partner.username and partner.password
        else None
    )
    with local_path.open("rb") as src:
        size = os.fstat(src.fileno()).st_size
        try:
            with httpx.Client(
                auth=auth, verify=partner.verify_tls, timeout=timeout, follow_redirects=False
            ) as client:
                # A file object is sent in 64 KiB reads with a Content-Length: never whole.
                response = client.put(
                    target,
                    content=src,
                    headers={"Content-Type": "application/octet-stream"},
                )
        except httpx.TimeoutException:
            raise _fail(partner, f"PUT {shown} timed out after {timeout:g} s", True) from None
        except httpx.UnsupportedProtocol:
            raise _fail(partner, f"unsupported URL {shown!r}", False) from None
        except httpx.ConnectError as exc:
            if _tls_verify_failed(exc):
                raise _fail(
                    partner,
                    f"TLS certificate of {shown} not trusted (verify_tls is on)",
                    False,
                ) from None
            raise _fail(partner, f"cannot connect for PUT {shown}: {_short(exc)}", True) from exc
        except httpx.TransportError as exc:
            raise _fail(partner, f"PUT {shown} failed: {_short(exc)}", True) from exc
        except httpx.InvalidURL:
            raise _fail(partner, f"invalid URL {shown!r}", False) from None
    status = response.status_code
    if 200 <= status < 300:
        log.info("pushed %s to partner %s over HTTP (%d bytes)", name, partner.name, size)
        return size
    retry = status >= 500 or status in _RETRYABLE_HTTP
    raise _fail(partner, f"PUT {shown} answered HTTP {status} {response.reason_phrase}", retry)
