"""Partner secrets at rest: passwords, private keys and their passphrases are stored
encrypted (Fernet: AES-128-CBC + HMAC-SHA256) with keys from the settings, never from the
database.

`FERRYLINK_SECRET_KEY` is a comma-separated list of Fernet keys: the first encrypts, every
one decrypts, so a key is rotated by putting a new one first, running `ferrylink secrets
reencrypt`, then dropping the old one. Stored values are `fernet:<token>`; a value without
the prefix is a clear value from before encryption (re-encrypted by that command). With no
key configured, secrets are stored in clear and the service warns at start.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cryptography.fernet import MultiFernet

log = logging.getLogger(__name__)
PREFIX = "fernet:"


class SecretError(ValueError):
    """A stored secret cannot be decrypted with the configured keys."""


def new_key() -> str:
    from cryptography.fernet import Fernet

    return Fernet.generate_key().decode()


def _check_key(key: str) -> None:
    """What Fernet checks of a key, without importing cryptography (~9 MB) at start."""
    try:
        if len(base64.urlsafe_b64decode(key)) == 32:
            return
    except (binascii.Error, ValueError):
        pass
    raise ValueError(
        "FERRYLINK_SECRET_KEY: each key must be 32 url-safe base64-encoded bytes "
        "(make one with `ferrylink secrets new-key`)"
    )


class SecretBox:
    """The configured keys; checked at once, the cipher (cryptography) made on first use, so
    a process that never reads or writes a partner secret does not load it."""

    def __init__(self, keys: str = "") -> None:
        self._keys = [k.strip() for k in keys.split(",") if k.strip()]
        for key in self._keys:
            _check_key(key)
        self._cipher: MultiFernet | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def _fernet(self) -> MultiFernet:
        with self._lock:
            if self._cipher is None:
                from cryptography.fernet import Fernet, MultiFernet

                self._cipher = MultiFernet([Fernet(k) for k in self._keys])
            return self._cipher

    def encrypt(self, value: str | None) -> str | None:
        if not value or not self.enabled or value.startswith(PREFIX):
            return value
        return PREFIX + self._fernet().encrypt(value.encode()).decode()

    def decrypt(self, value: str | None) -> str | None:
        if not value or not value.startswith(PREFIX):
            return value
        if not self.enabled:
            raise SecretError("a partner secret is encrypted but FERRYLINK_SECRET_KEY is unset")
        from cryptography.fernet import InvalidToken

        try:
            return self._fernet().decrypt(value[len(PREFIX) :].encode()).decode()
        except InvalidToken:
            raise SecretError("a partner secret does not decrypt with any configured key") from None

    def reencrypt(self, value: str | None) -> str | None:
        """Encrypted with the first key (clear values get encrypted)."""
        if not value or not self.enabled:
            return value
        if not value.startswith(PREFIX):
            return self.encrypt(value)
        from cryptography.fernet import InvalidToken

        try:
            rotated = self._fernet().rotate(value[len(PREFIX) :].encode())
        except InvalidToken:
            raise SecretError("a partner secret does not decrypt with any configured key") from None
        return PREFIX + rotated.decode()


_box = SecretBox()


def configure(keys: str) -> SecretBox:
    """Set the process's keys (the transaction manager at start, the CLI)."""
    global _box
    _box = SecretBox(keys)
    if not _box.enabled:
        log.warning("FERRYLINK_SECRET_KEY is unset: partner secrets are stored in clear")
    return _box


def box() -> SecretBox:
    return _box


def reencrypt_partners(engine: Any, secrets_at_rest: SecretBox) -> int:
    """Encrypt every partner secret with the first key (after a key was put first, or to
    encrypt secrets stored in clear); returns how many partners changed. One transaction."""
    from sqlmodel import Session, select

    from ferrylink.tables.accounts import Partner

    if not secrets_at_rest.enabled:
        raise SecretError("FERRYLINK_SECRET_KEY is unset: nothing to encrypt with")
    changed = 0
    with Session(engine) as session:
        for partner in session.exec(select(Partner)):
            before = (partner.password, partner.private_key, partner.private_key_passphrase)
            partner.password = secrets_at_rest.reencrypt(partner.password)
            partner.private_key = secrets_at_rest.reencrypt(partner.private_key)
            partner.private_key_passphrase = secrets_at_rest.reencrypt(
                partner.private_key_passphrase
            )
            if before != (partner.password, partner.private_key, partner.private_key_passphrase):
                session.add(partner)
                changed += 1
        session.commit()
    return changed
