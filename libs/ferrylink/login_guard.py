"""The failed-login defender for anything that checks a password (account uploads, the
edge proxy's sessions, administrators' logins).

Every failure is logged with the client's address and delays the answer (doubling per
recent failure from that address, capped); past a threshold of failures within a window
the address is banned for a while, and so is an account that many addresses fail on (a
spread-out guess). Banned attempts are refused before any password is checked, so they
neither cost a KDF run nor count again. An unknown account costs the same KDF run as a
known one (`check_password` verifies against a dummy hash), so timing tells nothing.

Where the counts live (`GuardStore`): a service process keeps them in the shared database
(`DatabaseGuardStore`), so failures spread over every server and service of the cluster
add up, and a ban holds on all of them. While the database cannot be reached, the process
counts alone in memory (logged); an app built without a database uses memory alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Protocol, TypeVar

from sqlalchemy import Table, and_, delete, func, insert, or_, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from ferrylink.db import writing
from ferrylink.errors import INFRASTRUCTURE_ERRORS
from ferrylink.metrics import LOGIN_BANS, LOGIN_FAILURES, LOGINS_REFUSED
from ferrylink.passwords import hash_password, verify_password
from ferrylink.tables.admin import LoginBan, LoginFailure

log = logging.getLogger(__name__)

ADDRESS, ACCOUNT = "address", "account"
KEY_LENGTH = 255  # the tables' key column


@dataclass(frozen=True)
class GuardPolicy:
    delay: float = 0.5  # seconds added to the first failure; doubles per further failure
    max_delay: float = 4.0
    address_threshold: int = 10  # failures within `window` that ban the address
    account_threshold: int = 30  # failures on one account (any address) that ban it
    window: float = 600.0
    ban_seconds: float = 900.0


class LoginRefused(Exception):
    """A banned address or account: the answer is 429 with `retry_after` seconds."""

    def __init__(self, reason: str, retry_after: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class GuardStore(Protocol):
    """The failures and bans the guard's rules read and write (times in epoch seconds)."""

    def banned_until(self, address: str, account: str) -> tuple[float, float]:
        """Until when the address and the account are banned (0: never was)."""
        ...

    def fail(self, address: str, account: str, now: float, window: float) -> tuple[int, int]:
        """Record a failure; the failures of the address and of the account within `window`
        before `now`, this one included."""
        ...

    def ban(self, scope: str, key: str, until: float) -> None:
        """Ban the address or account (`scope`) until `until`; its failures start again."""
        ...

    def forgive(self, address: str) -> None:
        """The address logged in: its failures are forgotten (a ban stays)."""
        ...


@dataclass
class _Counter:
    failures: deque[float] = field(default_factory=deque)
    banned_until: float = 0.0


class MemoryGuardStore:
    """This process alone counts."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: dict[str, dict[str, _Counter]] = {ADDRESS: {}, ACCOUNT: {}}

    def banned_until(self, address: str, account: str) -> tuple[float, float]:
        with self._lock:
            found = [self._tables[scope].get(key) for scope, key in
                     ((ADDRESS, address), (ACCOUNT, account))]  # fmt: skip
        by_address, by_account = (c.banned_until if c else 0.0 for c in found)
        return by_address, by_account

    def fail(self, address: str, account: str, now: float, window: float) -> tuple[int, int]:
        with self._lock:
            return (self._count(ADDRESS, address, now, window),
                    self._count(ACCOUNT, account, now, window))  # fmt: skip

    def ban(self, scope: str, key: str, until: float) -> None:
        with self._lock:
            counter = self._tables[scope].setdefault(key, _Counter())
            counter.banned_until = until
            counter.failures.clear()

    def forgive(self, address: str) -> None:
        with self._lock:
            counter = self._tables[ADDRESS].get(address)
            if counter:
                counter.failures.clear()

    def _count(self, scope: str, key: str, now: float, window: float) -> int:
        table = self._tables[scope]
        counter = table.setdefault(key, _Counter())
        while counter.failures and counter.failures[0] <= now - window:
            counter.failures.popleft()
        counter.failures.append(now)
        if len(table) > 100_000:  # bound memory under a flood of new addresses
            for stale in [k for k, c in table.items() if not c.failures and c.banned_until < now]:
                del table[stale]
        return len(counter.failures)


FAILURES: Table = LoginFailure.__table__  # type: ignore[attr-defined]
BANS: Table = LoginBan.__table__  # type: ignore[attr-defined]
T = TypeVar("T")


class DatabaseGuardStore:
    """Every process of the cluster counts in the shared database. Failures older than the
    window and lapsed bans are deleted as failures are recorded (index on their times)."""

    # While the database is away, a warning this often at most (each login would log one).
    WARN_EVERY_SECONDS = 60.0

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._alone = MemoryGuardStore()  # while the database cannot be reached
        self._warned_at: float | None = None

    def _or_alone(self, shared: Callable[[], T], alone: Callable[[], T]) -> T:
        try:
            return shared()
        except INFRASTRUCTURE_ERRORS as exc:
            now = time.monotonic()
            if self._warned_at is None or now - self._warned_at >= self.WARN_EVERY_SECONDS:
                self._warned_at = now
                log.warning("login guard: the database is unreachable (%s); this process "
                            "counts failed logins alone meanwhile", type(exc).__name__)  # fmt: skip
            return alone()

    def banned_until(self, address: str, account: str) -> tuple[float, float]:
        def shared() -> tuple[float, float]:
            query = select(BANS.c.scope, BANS.c.banned_until).where(
                or_(and_(BANS.c.scope == ADDRESS, BANS.c.key == address[:KEY_LENGTH]),
                    and_(BANS.c.scope == ACCOUNT, BANS.c.key == account[:KEY_LENGTH]))
            )  # fmt: skip
            with self.engine.connect() as connection:
                found = {scope: until for scope, until in connection.execute(query)}
            return found.get(ADDRESS, 0.0), found.get(ACCOUNT, 0.0)

        shared_bans = self._or_alone(shared, lambda: (0.0, 0.0))
        alone = self._alone.banned_until(address, account)
        return max(shared_bans[0], alone[0]), max(shared_bans[1], alone[1])

    def fail(self, address: str, account: str, now: float, window: float) -> tuple[int, int]:
        keys = ((ADDRESS, address[:KEY_LENGTH]), (ACCOUNT, account[:KEY_LENGTH]))

        def shared() -> tuple[int, int]:
            with writing(self.engine), self.engine.begin() as connection:
                connection.execute(delete(FAILURES).where(FAILURES.c.at <= now - window))
                connection.execute(delete(BANS).where(BANS.c.banned_until <= now))
                rows = [{"scope": scope, "key": key, "at": now} for scope, key in keys]
                connection.execute(insert(FAILURES), rows)
                counts = [
                    connection.execute(
                        select(func.count()).where(FAILURES.c.scope == s, FAILURES.c.key == k)
                    ).scalar_one()
                    for s, k in keys
                ]
            return counts[0], counts[1]

        return self._or_alone(shared, lambda: self._alone.fail(address, account, now, window))

    def ban(self, scope: str, key: str, until: float) -> None:
        def shared() -> None:
            key_ = key[:KEY_LENGTH]
            try:
                with writing(self.engine), self.engine.begin() as connection:
                    connection.execute(
                        delete(FAILURES).where(FAILURES.c.scope == scope, FAILURES.c.key == key_)
                    )
                    connection.execute(
                        delete(BANS).where(BANS.c.scope == scope, BANS.c.key == key_)
                    )
                    connection.execute(
                        insert(BANS), {"scope": scope, "key": key_, "banned_until": until}
                    )
            except IntegrityError:
                pass  # another process banned it at the same moment

        self._or_alone(shared, lambda: self._alone.ban(scope, key, until))

    def forgive(self, address: str) -> None:
        # Every successful login forgives (an HTTP upload logs in per request), and nearly
        # always there is nothing to forgive: a read first, so a success takes no write turn.
        where = (FAILURES.c.scope == ADDRESS, FAILURES.c.key == address[:KEY_LENGTH])

        def shared() -> None:
            with self.engine.connect() as connection:
                if connection.execute(select(FAILURES.c.id).where(*where).limit(1)).first() is None:
                    return
            with writing(self.engine), self.engine.begin() as connection:
                connection.execute(delete(FAILURES).where(*where))

        self._alone.forgive(address)
        self._or_alone(shared, lambda: None)


class LoginGuard:
    """The rules; the counts are in `store` (this process's memory unless given)."""

    def __init__(
        self,
        policy: GuardPolicy | None = None,
        clock: Callable[[], float] = time.time,
        store: GuardStore | None = None,
    ) -> None:
        self.policy = policy or GuardPolicy()
        self._clock = clock
        self.store: GuardStore = store or MemoryGuardStore()

    def check(self, address: str, account: str) -> None:
        """Raise LoginRefused while the address or the account is banned."""
        now = self._clock()
        for kind, until in zip((ADDRESS, ACCOUNT), self.store.banned_until(address, account),
                               strict=True):  # fmt: skip
            if until > now:
                LOGINS_REFUSED.labels(scope=kind).inc()
                raise LoginRefused(f"too many failed logins from this {kind}; try again later",
                                   until - now)  # fmt: skip

    def failed(self, address: str, account: str) -> float:
        """Record a failure; returns how long to delay the answer."""
        policy = self.policy
        now = self._clock()
        by_address, by_account = self.store.fail(address, account, now, policy.window)
        LOGIN_FAILURES.inc()
        if by_address >= policy.address_threshold:
            LOGIN_BANS.labels(scope=ADDRESS).inc()
            self.store.ban(ADDRESS, address, now + policy.ban_seconds)
            log.warning("login: banned address %s for %.0f s", address, policy.ban_seconds)
        if by_account >= policy.account_threshold:
            LOGIN_BANS.labels(scope=ACCOUNT).inc()
            self.store.ban(ACCOUNT, account, now + policy.ban_seconds)
            log.warning("login: banned account %r for %.0f s", account, policy.ban_seconds)
        log.warning("login failed for account %r from %s (%d recent)", account, address,
                    by_address)  # fmt: skip
        return min(policy.max_delay, policy.delay * 2 ** (min(by_address, 64) - 1))

    def succeeded(self, address: str, account: str) -> None:
        self.store.forgive(address)


@cache
def _dummy_hash() -> str:
    return hash_password("no account has this password")


def check_password(password: str, stored: str | None) -> bool:
    """verify_password, at the same cost when there is no stored hash (unknown account)."""
    if stored is None:
        verify_password(password, _dummy_hash())
        return False
    return verify_password(password, stored)
