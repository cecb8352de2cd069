"""The engine factory and the shared tables on both supported databases."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from ferrylink.db import create_tables, database_works, make_engine
from ferrylink.models import ClusterServer
from ferrylink.settings import FerrylinkSettings


def exercise(url: str) -> None:
    engine = make_engine(url)
    try:
        create_tables(engine)
        create_tables(engine)  # idempotent
        assert database_works(engine)
        with Session(engine) as session:
            session.add(ClusterServer(id="st2", position=1))
            session.add(ClusterServer(id="st1", position=0, api_url="http://st1:8101"))
            session.commit()
        with Session(engine) as session:
            ordered = session.exec(
                select(ClusterServer).order_by(col(ClusterServer.position))
            ).all()
            assert [s.id for s in ordered] == ["st1", "st2"]
        with Session(engine) as session, pytest.raises(IntegrityError):
            session.add(ClusterServer(id="st1", position=5))
            session.commit()
    finally:
        engine.dispose()


def test_sqlite_file_in_state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FERRYLINK_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.delenv("FERRYLINK_DATABASE_URL", raising=False)
    url = FerrylinkSettings().effective_database_url
    assert url == f"sqlite:///{tmp_path / 'state' / 'ferrylink.db'}"
    exercise(url)
    assert (tmp_path / "state" / "ferrylink.db").exists()


def test_postgresql_by_url(postgres_url: str) -> None:
    exercise(postgres_url)


def test_database_works_is_false_for_an_unreachable_database() -> None:
    engine = make_engine("postgresql+psycopg2://nobody@127.0.0.1:1/none?connect_timeout=1")
    assert not database_works(engine)
