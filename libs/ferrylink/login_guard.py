"""The failed-login defender for anything that checks a password (account uploads, the
edge proxy, administrators' logins).

Every failure is logged with the client's address and delays the answer (doubling per
recent failure from that address, capped); past a threshold of failures within a window
the address is banned for a while, and so is an account that many addresses fail on (a
spread-out guess). Banned attempts are refused before any password is checked, so they
neither cost a KDF run nor count again. An unknown account costs the same KDF run as a
known one (`check_password` verifies against a dummy hash), so timing tells nothing.

State is per process, in memory: a restart forgives, and each server counts on its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from ferrylink.metrics import LOGIN_BANS, LOGIN_FAILURES, LOGINS_REFUSED
from ferrylink.passwords import hash_password, verify_password

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GuardPolicy:
    delay: float = 0.5  # seconds added to the first failure; doubles per further failure
    max_delay: float = 4.0
    address_threshold: int = 10  # failures within `window` that ban the address
    account_threshold: int = 30  # failures on one account (any address) that ban it
    window: float = 600.0
    ban_seconds: float = 900.0


@dataclass
class _Counter:
    failures: deque[float] = field(default_factory=deque)
    banned_until: float = 0.0


class LoginRefused(Exception):
    """A banned address or account: the answer is 429 with `retry_after` seconds."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class LoginGuard:
    def __init__(
        self, policy: GuardPolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or GuardPolicy()
        self._clock = clock
        self._lock = threading.Lock()
        self._addresses: dict[str, _Counter] = {}
        self._accounts: dict[str, _Counter] = {}

    def check(self, address: str, account: str) -> None:
        """Raise LoginRefused while the address or the account is banned."""
        now = self._clock()
        with self._lock:
            for kind, key, table in (
                ("address", address, self._addresses),
                ("account", account, self._accounts),
            ):
                counter = table.get(key)
                if counter and counter.banned_until > now:
                    LOGINS_REFUSED.labels(scope=kind).inc()
                    raise LoginRefused(
                        f"too many failed logins from this {kind}; try again later",
                        counter.banned_until - now,
                    )

    def failed(self, address: str, account: str) -> float:
        """Record a failure; returns how long to delay the answer."""
        policy = self.policy
        now = self._clock()
        with self._lock:
            by_address = self._count(self._addresses, address, now)
            by_account = self._count(self._accounts, account, now)
            LOGIN_FAILURES.inc()
            if len(by_address.failures) >= policy.address_threshold:
                LOGIN_BANS.labels(scope="address").inc()
                by_address.banned_until = now + policy.ban_seconds
                by_address.failures.clear()
                log.warning("login: banned address %s for %.0f s", address, policy.ban_seconds)
            if len(by_account.failures) >= policy.account_threshold:
                LOGIN_BANS.labels(scope="account").inc()
                by_account.banned_until = now + policy.ban_seconds
                by_account.failures.clear()
                log.warning("login: banned account %r for %.0f s", account, policy.ban_seconds)
            recent = len(by_address.failures) or policy.address_threshold
        log.warning("login failed for account %r from %s (%d recent)", account, address, recent)
        return min(policy.max_delay, policy.delay * 2 ** (recent - 1))

    def succeeded(self, address: str, account: str) -> None:
        with self._lock:
            counter = self._addresses.get(address)
            if counter:
                counter.failures.clear()

    def _count(self, table: dict[str, _Counter], key: str, now: float) -> _Counter:
        counter = table.setdefault(key, _Counter())
        while counter.failures and counter.failures[0] <= now - self.policy.window:
            counter.failures.popleft()
        counter.failures.append(now)
        if len(table) > 100_000:  # bound memory under a flood of new addresses
            for stale in [k for k, c in table.items() if not c.failures and c.banned_until < now]:
                del table[stale]
        return counter


@cache
def _dummy_hash() -> str:
    return hash_password("no account has this password")


def check_password(password: str, stored: str | None) -> bool:
    """verify_password, at the same cost when there is no stored hash (unknown account)."""
    if stored is None:
        verify_password(password, _dummy_hash())
        return False
    return verify_password(password, stored)
