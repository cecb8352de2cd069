"""Fixtures of the folder-monitor, scheduler and scheduled-transfer tests; loaded with
`pytest_plugins = ["tests.scheduling_fixtures"]` (never imported directly)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine

from ferrylink.db import create_tables, make_engine
from ferrylink.messaging import Publisher, Topology
from tests.scheduling_support import EventQueue


@pytest.fixture
def event_queue(amqp_url: str, prefix: str) -> Iterator[EventQueue]:
    topology = Topology(prefix=prefix)
    publisher = Publisher([amqp_url], declare=topology.declare).start()
    assert publisher.wait_connected(30)
    try:
        yield EventQueue(amqp_url, topology, publisher)
    finally:
        publisher.close()


@pytest.fixture
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """SQLite by default; `@pytest.mark.parametrize("engine", ["postgresql"], indirect=True)`
    gives a fresh database on the local PostgreSQL instead."""
    if getattr(request, "param", "sqlite") == "postgresql":
        url = request.getfixturevalue("postgres_url")
    else:
        url = f"sqlite:///{tmp_path / 'ferrylink.db'}"
    engine = make_engine(url)
    create_tables(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    path = tmp_path / "data"
    path.mkdir()
    return path
