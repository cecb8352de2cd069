"""The failed-login defender: its rules on a fake clock, with the counts in memory and in
a database (SQLite, PostgreSQL); two guards sharing a database as two processes do; and
real transaction-manager processes taking wrong upload passwords."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import event
from sqlmodel import Session

from ferrylink import login_guard
from ferrylink.db import create_tables, make_engine
from ferrylink.login_guard import (
    DatabaseGuardStore,
    GuardPolicy,
    GuardStore,
    LoginGuard,
    LoginRefused,
    MemoryGuardStore,
    check_password,
)
from ferrylink.models import Account
from ferrylink.passwords import hash_password
from ferrylink_ops.processes import port_free
from tests.helpers import wait_until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = GuardPolicy(delay=0.1, max_delay=0.8, address_threshold=5, account_threshold=8,
                     window=60, ban_seconds=300)  # fmt: skip


@pytest.fixture(params=["memory", "sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[GuardStore]:
    """Where a guard counts: the same rules hold in each."""
    if request.param == "memory":
        yield MemoryGuardStore()
        return
    url = (request.getfixturevalue("postgres_url") if request.param == "postgresql"
           else f"sqlite:///{tmp_path / 'guard.db'}")  # fmt: skip
    engine = make_engine(url)
    create_tables(engine)
    yield DatabaseGuardStore(engine)
    engine.dispose()


def banned(guard: LoginGuard, address: str, account: str) -> str | None:
    try:
        guard.check(address, account)
    except LoginRefused as exc:
        return exc.reason
    return None


def test_delays_double_then_the_address_is_banned_for_a_while(store: GuardStore) -> None:
    clock = Clock()
    guard = LoginGuard(POLICY, clock, store)
    delays = [guard.failed("10.0.0.1", "acme") for _ in range(4)]
    assert delays == [0.1, 0.2, 0.4, 0.8]
    assert banned(guard, "10.0.0.1", "acme") is None
    guard.failed("10.0.0.1", "acme")  # the 5th: banned
    assert "from this address" in (banned(guard, "10.0.0.1", "acme") or "")
    assert "from this address" in (banned(guard, "10.0.0.1", "other") or "")
    assert banned(guard, "10.0.0.2", "acme") is None  # another address is not
    clock.now += 301
    assert banned(guard, "10.0.0.1", "acme") is None  # the ban lapses


def test_failures_outside_the_window_do_not_count_and_success_forgives(store: GuardStore) -> None:
    clock = Clock()
    guard = LoginGuard(POLICY, clock, store)
    for _ in range(4):
        guard.failed("10.0.0.1", "acme")
    clock.now += 61
    assert guard.failed("10.0.0.1", "acme") == 0.1  # the old ones left the window
    guard.succeeded("10.0.0.1", "acme")
    assert guard.failed("10.0.0.1", "acme") == 0.1


def test_an_account_guessed_from_many_addresses_is_banned(store: GuardStore) -> None:
    guard = LoginGuard(POLICY, Clock(), store)
    for i in range(8):
        guard.failed(f"10.0.1.{i}", "acme")
    assert "from this account" in (banned(guard, "10.0.9.9", "acme") or "")
    assert banned(guard, "10.0.9.9", "other") is None


@pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)
def test_failures_on_two_processes_add_up_and_a_ban_holds_on_both(store: GuardStore) -> None:
    """Two guards on one database, as two servers of a cluster: failures spread over both
    ban the address on both; a success on one forgives on both; an account guessed on
    both is banned on both."""
    assert isinstance(store, DatabaseGuardStore)
    clock = Clock()
    one = LoginGuard(POLICY, clock, store)
    two = LoginGuard(POLICY, clock, DatabaseGuardStore(store.engine))
    assert [g.failed("10.0.0.1", "acme") for g in (one, two, one)] == [0.1, 0.2, 0.4]
    two.succeeded("10.0.0.1", "acme")
    assert one.failed("10.0.0.1", "acme") == 0.1  # forgiven on both
    for guard in (two, one, two):
        guard.failed("10.0.0.1", "acme")
    assert banned(one, "10.0.0.1", "x") is None and banned(two, "10.0.0.1", "x") is None
    two.failed("10.0.0.1", "acme")  # the 5th within the window, over both
    assert "from this address" in (banned(one, "10.0.0.1", "x") or "")
    assert "from this address" in (banned(two, "10.0.0.1", "x") or "")
    for i in range(8):  # 8 failures on the account, each from a new address
        (one if i % 2 else two).failed(f"10.0.2.{i}", "other")
    assert "from this account" in (banned(one, "10.0.9.9", "other") or "")
    assert "from this account" in (banned(two, "10.0.9.8", "other") or "")
    clock.now += 301
    assert banned(one, "10.0.0.1", "acme") is None and banned(two, "10.0.9.9", "other") is None


@pytest.mark.parametrize("store", ["sqlite", "postgresql"], indirect=True)
def test_a_login_with_nothing_to_forgive_writes_nothing(store: GuardStore) -> None:
    """Each HTTP upload logs in: its check and its success only read the database."""
    assert isinstance(store, DatabaseGuardStore)
    statements: list[str] = []

    def seen(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement.split()[0].upper())

    event.listen(store.engine, "before_cursor_execute", seen)
    guard = LoginGuard(POLICY, Clock(), store)
    guard.check("10.0.0.1", "acme")
    guard.succeeded("10.0.0.1", "acme")
    assert statements and set(statements) == {"SELECT"}
    guard.failed("10.0.0.1", "acme")
    statements.clear()
    guard.succeeded("10.0.0.1", "acme")  # now there is a failure to forget
    assert "DELETE" in statements
    assert guard.failed("10.0.0.1", "acme") == 0.1  # forgotten


def test_without_its_database_a_process_counts_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The database is unreachable (a file in a directory that does not exist): logins are
    still guarded, by this process's own counts, and the log says so once, not per login."""
    unreachable = make_engine(f"sqlite:///{tmp_path / 'missing' / 'guard.db'}")
    guard = LoginGuard(POLICY, Clock(), DatabaseGuardStore(unreachable))
    assert banned(guard, "10.0.0.1", "acme") is None
    delays = [guard.failed("10.0.0.1", "acme") for _ in range(5)]
    assert delays == [0.1, 0.2, 0.4, 0.8, 0.8]
    assert "from this address" in (banned(guard, "10.0.0.1", "acme") or "")
    warnings = [r for r in caplog.records if "database is unreachable" in r.getMessage()]
    assert len(warnings) == 1


def test_an_unknown_account_runs_the_same_kdf(monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []
    real = login_guard.verify_password

    def counting(password: str, stored: str | None) -> bool:
        checked.append(stored or "")
        return real(password, stored)

    monkeypatch.setattr(login_guard, "verify_password", counting)
    known = hash_password("right password")
    assert check_password("right password", known)
    assert not check_password("wrong", None)
    assert len(checked) == 2 and checked[1].startswith("scrypt$")
    # The same cost parameters as a real account's hash.
    assert checked[1].split("$")[1:4] == known.split("$")[1:4]


# --------------------------------------------------------------------------------------------
# A real process: 50 wrong passwords from 127.0.0.2
# --------------------------------------------------------------------------------------------


def free_port(taken: Collection[int] = ()) -> int:
    for port in range(23000, 24000, 7):
        if port not in taken and port_free(port):
            return port
    raise RuntimeError("no free port")


@pytest.fixture
def tm_processes(
    tmp_path: Path, amqp_url: str, prefix: str
) -> Iterator[Callable[[int], list[tuple[str, Path]]]]:
    """Start `n` transaction managers (servers st1, st2...) on one database; each one's URL
    and log."""
    database = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    engine = make_engine(database)
    create_tables(engine)
    with Session(engine) as session:
        session.add(Account(name="acme", password_hash=hash_password("correct horse"),
                            home="homes/acme"))  # fmt: skip
        session.commit()
    engine.dispose()
    processes: list[subprocess.Popen[bytes]] = []

    def start(n: int) -> list[tuple[str, Path]]:
        started: list[tuple[str, Path]] = []
        for i in range(1, n + 1):
            port = free_port(taken={int(url.rsplit(":", 1)[1]) for url, _log in started})
            log_path = tmp_path / f"tm-st{i}.log"
            env = dict(os.environ, FERRYLINK_DATABASE_URL=database, FERRYLINK_AMQP_URL=amqp_url,
                       FERRYLINK_NAME_PREFIX=prefix, FERRYLINK_HTTP_PORT=str(port),
                       FERRYLINK_NODE_ID=f"st{i}", FERRYLINK_STATE_DIR=str(tmp_path / f"st{i}"),
                       FERRYLINK_DATA_DIR=str(tmp_path / "data"),
                       FERRYLINK_LOGIN_FAILURE_DELAY="0.05", FERRYLINK_LOGIN_MAX_DELAY="0.4",
                       FERRYLINK_LOGIN_ADDRESS_THRESHOLD="10",
                       FERRYLINK_LOGIN_BAN_SECONDS="120")  # fmt: skip
            with log_path.open("wb") as log:
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "ferrylink_ops.cli", "service", "transaction-manager"],
                    env=env, stdout=log, stderr=subprocess.STDOUT,
                ))  # fmt: skip
            started.append((f"http://127.0.0.1:{port}", log_path))
        for base, _log in started:

            def ready(base: str = base) -> bool:
                try:
                    return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_until(ready, 60, f"the transaction manager at {base} ready")
        return started

    try:
        yield start
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def client_from(address: str) -> httpx.Client:
    return httpx.Client(transport=httpx.HTTPTransport(local_address=address), timeout=30)


def test_50_wrong_passwords_are_slowed_then_banned_while_another_address_logs_in(
    tm_processes: Callable[[int], list[tuple[str, Path]]],
) -> None:
    [(base, log_path)] = tm_processes(1)
    url = f"{base}/files/acme/report.csv"
    answers: list[tuple[int, float]] = []
    with client_from("127.0.0.2") as attacker:
        for i in range(50):
            started = time.monotonic()
            response = attacker.put(url, content=b"x", auth=("acme", f"guess-{i}"))
            answers.append((response.status_code, time.monotonic() - started))
        still_banned = attacker.put(url, content=b"x", auth=("acme", "correct horse"))
    statuses = [status for status, _ in answers]
    # Ten failures answered 401, each held back at least its (doubling, capped) delay...
    assert statuses[:10] == [401] * 10
    for n, (_, elapsed) in enumerate(answers[:10], start=1):
        assert elapsed >= min(0.4, 0.05 * 2 ** (n - 1)), (n, elapsed)
    # ...then the address is banned: every further attempt, even the right password, is 429.
    assert statuses[10:] == [429] * 40
    assert still_banned.status_code == 429 and "try again later" in still_banned.text
    assert int(still_banned.headers["retry-after"]) > 0
    # Another address logs in with the right password: the account itself is not locked.
    with client_from("127.0.0.3") as partner:
        ok = partner.put(url, content=b"a,b\n", auth=("acme", "correct horse"))
    assert ok.status_code == 201, ok.text
    log = log_path.read_text()
    assert log.count("login failed for account 'acme' from 127.0.0.2") == 10
    assert "banned address 127.0.0.2" in log
    assert "guess-" not in log and "correct horse" not in log  # no password in the log


def test_wrong_passwords_spread_over_two_servers_add_up_to_a_ban_on_both(
    tm_processes: Callable[[int], list[tuple[str, Path]]],
) -> None:
    """An attacker alternating between two servers' transaction managers: 5 failures on
    each are the threshold of 10, and both refuse the address from then on (each one
    alone would have let it guess 10 times per server)."""
    servers = tm_processes(2)
    urls = [f"{base}/files/acme/report.csv" for base, _log in servers]
    with client_from("127.0.0.2") as attacker:
        statuses = [attacker.put(urls[i % 2], content=b"x", auth=("acme", f"guess-{i}"))
                    .status_code for i in range(14)]  # fmt: skip
        still = [attacker.put(url, content=b"x", auth=("acme", "correct horse")) for url in urls]
    assert statuses == [401] * 10 + [429] * 4
    assert [r.status_code for r in still] == [429, 429]
    counted = [log.read_text().count("login failed for account 'acme' from 127.0.0.2")
               for _base, log in servers]  # fmt: skip
    assert counted == [5, 5]
    with client_from("127.0.0.3") as partner:  # the account itself is not locked
        assert (
            partner.put(urls[1], content=b"a\n", auth=("acme", "correct horse")).status_code == 201
        )
