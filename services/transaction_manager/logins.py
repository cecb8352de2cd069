"""Checking a partner's login (password or SSH public key) against its account.

One place for every protocol (the TM's own HTTP upload, and sessions coming through an
edge), so that a failed-login defender wraps exactly this function. The client's address is
passed in for it (and for the log), never the secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import time

from sqlmodel import Session

from ferrylink.passwords import hash_password, verify_password
from ferrylink.tables.accounts import Account
from ferrylink.tables.cluster import ClusterSetting

log = logging.getLogger(__name__)

# Verified when the account does not exist, so an unknown name costs the same time.
_DUMMY_HASH = hash_password(secrets.token_hex(16))
TOKEN_KEY_SETTING = "edge_session_token_key"


def key_blob(public_key_line: str) -> str:
    """The type and base64 parts of an OpenSSH public key line (the comment dropped)."""
    parts = public_key_line.strip().split()
    return " ".join(parts[:2]) if len(parts) >= 2 else ""


def verify_login(
    session: Session,
    name: str,
    client_address: str,
    protocol: str,
    password: str | None = None,
    public_key: str | None = None,
) -> Account | None:
    """The enabled account `name` if the password or public key is right, else None."""
    account = session.get(Account, name)
    usable = account is not None and account.enabled
    if public_key is not None:
        offered = key_blob(public_key)
        keys = (
            {key_blob(k) for k in account.ssh_public_keys.splitlines() if k} if account else set()
        )
        ok = usable and bool(offered) and offered in keys
        method = "publickey"
    else:
        stored = account.password_hash if usable and account else None
        ok = verify_password(password or "", stored or _DUMMY_HASH) and stored is not None
        method = "password"
    if not ok:
        log.warning(
            "failed %s login for account %r from %s over %s", method, name, client_address, protocol
        )
        return None
    log.info("%s login of account %r from %s over %s", method, name, client_address, protocol)
    return account


# --------------------------------------------------------------------------------------------
# Session tokens: an HTTPS client logs in once and sends the token with every request, so
# it does not pay a password hash per file. Signed with a key only the backends know (kept
# in the shared database), so any backend accepts a token another one issued.
# --------------------------------------------------------------------------------------------


def _token_key(session: Session) -> bytes:
    row = session.get(ClusterSetting, TOKEN_KEY_SETTING)
    if row is None:
        session.add(ClusterSetting(key=TOKEN_KEY_SETTING, value=secrets.token_hex(32)))
        try:
            session.commit()
        except Exception:  # another backend created it at the same moment
            session.rollback()
        row = session.get(ClusterSetting, TOKEN_KEY_SETTING)
        assert row is not None
    return bytes.fromhex(row.value)


def issue_token(session: Session, account: str, lifetime: float) -> str:
    expires = int(time.time() + lifetime)
    payload = f"{account}:{expires}".encode()
    signature = hmac.new(_token_key(session), payload, hashlib.sha256).digest()
    return base64.urlsafe_b64encode(payload).decode() + "." + _b64(signature)


def check_token(session: Session, token: str) -> str | None:
    """The account a valid, unexpired token belongs to, else None."""
    try:
        payload_text, signature_text = token.split(".", 1)
        payload = base64.urlsafe_b64decode(payload_text.encode())
        signature = base64.urlsafe_b64decode(signature_text.encode() + b"==")
        account, expires = payload.decode().rsplit(":", 1)
    except (ValueError, UnicodeDecodeError):
        return None
    expected = hmac.new(_token_key(session), payload, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature) or int(expires) < time.time():
        return None
    return account


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")
