"""Coordinator leadership as a lease row in the shared database.

The database is the distributed engine here (PostgreSQL in a real cluster): a renewal counts
only once its transaction committed, and a lease is taken over only after it expired, so at
most one coordinator holds an unexpired lease. Every change of holder increments `term`.
Lease times are on the database's clock, so no two coordinators judge a lease by different
clocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from ferrylink.fencing import read_db_time
from ferrylink.tables.cluster import LeaderLease


@dataclass(frozen=True)
class Lease:
    holder: str
    term: int
    expires_at: float


def ensure_lease_row(session: Session) -> None:
    if session.get(LeaderLease, 1) is None:
        session.add(LeaderLease(id=1))
        try:
            session.commit()
        except IntegrityError:  # another coordinator created it first
            session.rollback()


def begin_step(session: Session, lease_seconds: float) -> float:
    """Start the leader's transaction: the database's time now. On PostgreSQL the server
    also ends this transaction if this process leaves it idle (frozen) for as long as a
    lease, so a frozen coordinator never holds the lease and cluster-state rows locked past
    the lease it may have renewed."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(
            select(func.set_config("idle_in_transaction_session_timeout",
                                   str(int(lease_seconds * 1000)), True))
        )  # fmt: skip
    return read_db_time(session)


def acquire_or_renew(session: Session, holder: str, now: float, duration: float) -> Lease | None:
    """Renew our lease, or take an expired one, inside the caller's transaction; `now` is
    the database's time (`begin_step`).

    Returns the lease if we hold it after this statement (valid once the caller commits),
    None if another coordinator holds an unexpired lease.
    """
    lease = session.get(LeaderLease, 1, populate_existing=True)
    previous_holder = lease.holder if lease else ""
    result = session.execute(
        update(LeaderLease)
        .where(LeaderLease.id == 1)  # type: ignore[arg-type]
        .where(or_(LeaderLease.holder == holder, LeaderLease.expires_at < now))  # type: ignore[arg-type]
        .values(
            holder=holder,
            expires_at=now + duration,
            term=LeaderLease.term + (0 if previous_holder == holder else 1),
        )
    )
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    lease = session.get(LeaderLease, 1, populate_existing=True)
    assert lease is not None
    return Lease(holder=lease.holder, term=lease.term, expires_at=lease.expires_at)


def current_lease(session: Session) -> Lease | None:
    lease = session.get(LeaderLease, 1, populate_existing=True)
    if lease is None or not lease.holder:
        return None
    return Lease(holder=lease.holder, term=lease.term, expires_at=lease.expires_at)
