"""The edge's own keys: the SSH host key and the TLS certificate of the HTTPS port.

Made at first start when missing (a self-signed certificate is fine for local runs; give a
real one by putting `tls.crt`/`tls.key` in the keys folder). Several edges pointed at the
same folder share them; creation happens under a file lock, so two edges starting at once
end up with the same keys.
"""

from __future__ import annotations

import datetime
import fcntl
import ipaddress
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import asyncssh
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HOST_KEY = "ssh_host_ed25519_key"
TLS_CERT = "tls.crt"
TLS_KEY = "tls.key"


@contextmanager
def _locked(keys_dir: Path) -> Iterator[None]:
    keys_dir.mkdir(parents=True, exist_ok=True)
    with (keys_dir / ".lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_secret(path: Path, content: bytes) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as stream:
        stream.write(content)
    os.replace(temporary, path)


def ensure_host_key(keys_dir: Path) -> Path:
    path = keys_dir / HOST_KEY
    with _locked(keys_dir):
        if not path.exists():
            _write_secret(path, asyncssh.generate_private_key("ssh-ed25519").export_private_key())
    return path


def ensure_tls(keys_dir: Path, hostnames: list[str]) -> tuple[Path, Path]:
    """(certificate, key) paths; a self-signed certificate for `hostnames` when missing."""
    cert_path, key_path = keys_dir / TLS_CERT, keys_dir / TLS_KEY
    with _locked(keys_dir):
        if not (cert_path.exists() and key_path.exists()):
            key_pem, cert_pem = _self_signed(hostnames)
            _write_secret(key_path, key_pem)
            _write_secret(cert_path, cert_pem)
    return cert_path, key_path


def _self_signed(hostnames: list[str]) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ferrylink-edge")])
    alt_names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            alt_names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt_names.append(x509.DNSName(host))
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)
