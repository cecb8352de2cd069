"""The claim keeper on SQLite and PostgreSQL: a claim held by a live handler outlasts its
lifetime; one its holder let go of (done, released, or taken by another copy after it ran
out) is not kept; a claim no longer renewed runs out."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from ferrylink.db import make_engine
from ferrylink.fencing import read_db_time
from ferrylink.schema import prepare_schema
from services.transaction_manager import claims
from tests.helpers import wait_until

LIFETIME = 1.0


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    url = (request.getfixturevalue("postgres_url") if request.param == "postgresql"
           else f"sqlite:///{tmp_path / 'claims.db'}")  # fmt: skip
    engine = make_engine(url)
    prepare_schema(engine, upgrade=True)
    yield engine
    engine.dispose()


def db_time(engine: Engine) -> float:
    with engine.connect() as connection:
        return read_db_time(connection)


def test_a_held_claim_outlasts_its_lifetime_and_runs_out_once_let_go(engine: Engine) -> None:
    keeper = claims.ClaimKeeper(engine, LIFETIME)
    try:
        assert claims.take(engine, "e1", "st1:1:a", LIFETIME)
        taken_at = db_time(engine)
        with keeper.holding("st1:1:a", ["e1"]):
            # Well past the lifetime, on the database's clock: still ours.
            wait_until(lambda: db_time(engine) > taken_at + 3 * LIFETIME, 10, "three lifetimes")
            assert not claims.take(engine, "e1", "st2:2:b", LIFETIME), "the claim ran out"
        assert keeper.held() == {}
        # Let go of (its handler ended without finishing it, e.g. it died): it runs out.
        wait_until(lambda: claims.take(engine, "e1", "st2:2:b", LIFETIME), 10,
                   "another copy to take the claim")  # fmt: skip
    finally:
        keeper.stop()


def test_a_released_claim_is_not_kept(engine: Engine) -> None:
    keeper = claims.ClaimKeeper(engine, 60.0)
    keeper.stop()  # rounds by hand
    assert claims.take(engine, "e1", "st1:1:a", 60.0)
    with keeper.holding("st1:1:a", ["e1"]):
        assert keeper.renew() == 1
        claims.release(engine, "e1", "st1:1:a")  # a failure to retry: the next copy goes
        assert keeper.renew() == 0
        assert keeper.held() == {"st1:1:a": set()}
        assert claims.take(engine, "e1", "st2:2:b", 60.0)


def test_a_claim_another_copy_took_is_forgotten(engine: Engine) -> None:
    keeper = claims.ClaimKeeper(engine, 60.0)
    keeper.stop()
    assert claims.take(engine, "e1", "st1:1:a", 0.2)
    assert claims.take(engine, "e2", "st1:1:a", 60.0)
    wait_until(lambda: claims.take(engine, "e1", "st2:2:b", 60.0), 10, "e1 to run out")
    with keeper.holding("st1:1:a", ["e1", "e2"]):
        assert keeper.renew() == 1
        assert keeper.held() == {"st1:1:a": {"e2"}}
    assert not claims.take(engine, "e1", "st1:1:c", 60.0)  # still the other copy's
