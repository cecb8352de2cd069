"""Shared test fixtures: a real broker, a per-test name prefix, real databases.

Broker, in order of preference:
1. `FERRYLINK_AMQP_URL` when set (e.g. the machine's RabbitMQ);
2. a private node started from the installed `rabbitmq-server` on free ports;
3. a RabbitMQ testcontainer when a Docker engine answers.
Every test gets its own name prefix, so tests never see each other's queues.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest

from tests.cluster_support import delete_broker_objects


@pytest.fixture(scope="session")
def amqp_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    url = os.environ.get("FERRYLINK_AMQP_URL")
    if url:
        yield url
        return
    if shutil.which("rabbitmq-server"):
        from ferrylink_ops.private_broker import start_private_broker

        node = start_private_broker(tmp_path_factory.mktemp("broker"))
        try:
            yield node.url
        finally:
            node.stop()
        return
    try:
        from testcontainers.rabbitmq import RabbitMqContainer
    except ImportError:  # pragma: no cover
        pytest.skip("no broker: set FERRYLINK_AMQP_URL, install rabbitmq-server or Docker")
    with RabbitMqContainer("rabbitmq:3.10") as container:  # pragma: no cover
        params = container.get_connection_params()
        yield f"amqp://guest:guest@{params.host}:{params.port}/%2F"


@pytest.fixture
def prefix(amqp_url: str) -> Iterator[str]:
    """A unique queue/exchange name prefix; everything under it is deleted afterwards."""
    name = f"t{uuid.uuid4().hex[:10]}"
    yield name
    delete_broker_objects(name, amqp_url)


@pytest.fixture
def cluster_amqp_url(amqp_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """The test broker, also handed to `ferrylink` subprocesses through the environment."""
    monkeypatch.setenv("FERRYLINK_AMQP_URL", amqp_url)
    return amqp_url


@pytest.fixture
def cluster_prefix(cluster_amqp_url: str) -> Iterator[str]:
    """A unique name prefix for a local cluster's queues and exchanges, deleted afterwards."""
    name = f"fltest-{uuid.uuid4().hex[:10]}"
    yield name
    delete_broker_objects(name, cluster_amqp_url)


@pytest.fixture(scope="module")
def broker_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list]:
    """A private 3-node RabbitMQ cluster, so fault tests can kill nodes."""
    if not shutil.which("rabbitmq-server"):
        pytest.skip("fault tests need the installed rabbitmq-server")
    from ferrylink_ops.private_broker import start_broker_cluster, stop_all

    nodes = start_broker_cluster(tmp_path_factory.mktemp("cluster"), size=3)
    try:
        yield nodes
    finally:
        stop_all(nodes)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh database on the local PostgreSQL, dropped afterwards."""
    admin_dsn = os.environ.get("FERRYLINK_TEST_POSTGRES_DSN", "host=127.0.0.1 user=postgres")
    name = f"ferrylink_test_{uuid.uuid4().hex[:8]}"
    try:
        admin = psycopg2.connect(admin_dsn + " dbname=postgres")
    except psycopg2.OperationalError as exc:
        pytest.skip(f"no PostgreSQL: {exc}")
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        params = dict(p.split("=", 1) for p in admin_dsn.split())
        yield (
            f"postgresql+psycopg2://{params.get('user', 'postgres')}@"
            f"{params.get('host', '127.0.0.1')}/{name}"
        )
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    path = tmp_path / "state"
    path.mkdir()
    return path


@pytest.fixture
def make_cluster(tmp_path: Path, cluster_prefix: str, cluster_amqp_url: str) -> Iterator[Any]:
    """Start local clusters (`ferrylink up --detach`); every one is stopped afterwards."""
    from tests.cluster_support import Cluster, ferrylink, kill_leftovers, start_cluster

    started: list[Cluster] = []

    def make(
        mode: str, servers: int = 3, edges: int = 1, database_url: str | None = None
    ) -> Cluster:
        cluster = start_cluster(tmp_path, cluster_prefix, cluster_amqp_url, mode, servers, edges,
                                database_url)  # fmt: skip
        started.append(cluster)
        return cluster

    yield make
    for cluster in started:
        cluster.http.close()
        ferrylink("down", "--state-dir", str(cluster.state_dir))
        kill_leftovers(cluster.state_dir)
