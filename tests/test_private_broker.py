"""Private RabbitMQ nodes really start, serve quorum queues, survive a node kill, and leave
no process behind (ferrylink_ops.private_broker)."""

from __future__ import annotations

import time
from pathlib import Path

import pika
import pytest

from ferrylink_ops.polling import wait_until
from ferrylink_ops.private_broker import (
    BrokerNode,
    find_node_pids,
    rabbitmq_installed,
    start_broker_cluster,
    start_private_broker,
    stop_all,
)
from ferrylink_ops.processes import pid_alive

pytestmark = pytest.mark.skipif(
    not rabbitmq_installed(), reason="needs the installed rabbitmq-server"
)

QUORUM = {"x-queue-type": "quorum"}


def test_single_node_serves_a_quorum_queue_and_stops_cleanly(tmp_path: Path) -> None:
    node = start_private_broker(tmp_path)
    try:
        beam_pid = node.beam_pid
        assert beam_pid is not None and pid_alive(beam_pid)
        assert node.url == f"amqp://guest:guest@127.0.0.1:{node.amqp_port}/%2F"

        connection = pika.BlockingConnection(pika.URLParameters(node.url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare("q.single", durable=True, arguments=QUORUM)
            channel.basic_publish(
                "", "q.single", b"hello", pika.BasicProperties(delivery_mode=2), mandatory=True
            )
            method, _, body = channel.basic_get("q.single", auto_ack=True)
            assert method is not None and body == b"hello"
        finally:
            connection.close()
    finally:
        node.stop()

    assert not pid_alive(beam_pid)
    assert find_node_pids([node.name]) == []
    assert not node.is_running()


@pytest.mark.fault
def test_cluster_keeps_every_message_when_a_node_is_killed(tmp_path: Path) -> None:
    started = time.monotonic()
    nodes = start_broker_cluster(tmp_path, size=3)
    boot_seconds = time.monotonic() - started
    names = [node.name for node in nodes]
    try:
        print(f"3-node cluster booted in {boot_seconds:.1f} s")
        assert nodes[0].running_nodes() == sorted(names)
        connected, survivor, victim = nodes

        connection = pika.BlockingConnection(pika.URLParameters(connected.url))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.queue_declare("q.cluster", durable=True, arguments=QUORUM)
            for i in range(100):
                # With confirms on, basic_publish raises unless the broker confirms.
                channel.basic_publish(
                    "",
                    "q.cluster",
                    f"m{i}".encode(),
                    pika.BasicProperties(delivery_mode=2),
                    mandatory=True,
                )
        finally:
            connection.close()

        victim_pid = victim.beam_pid
        assert victim_pid is not None
        victim.kill()
        assert not pid_alive(victim_pid)
        assert find_node_pids([victim.name]) == []
        wait_until(
            lambda: victim.name not in survivor.running_nodes(), 30, "the kill to be noticed"
        )

        # The queue is still declared with 100 messages on the connected node...
        connection = pika.BlockingConnection(pika.URLParameters(connected.url))
        try:
            declared = connection.channel().queue_declare("q.cluster", passive=True)
            assert declared.method.message_count == 100
        finally:
            connection.close()

        # ...and the other survivor serves every one of them.
        received: list[bytes] = []
        connection = pika.BlockingConnection(pika.URLParameters(survivor.url))
        try:
            channel = connection.channel()
            while True:
                method, _, body = channel.basic_get("q.cluster")
                if method is None:
                    break
                received.append(body)
                channel.basic_ack(method.delivery_tag)
        finally:
            connection.close()
        assert sorted(received) == sorted(f"m{i}".encode() for i in range(100))

        # The killed node comes back on its data dir and rejoins by itself.
        victim.restart()
        wait_until(lambda: connected.running_nodes() == sorted(names), 60, "the node to rejoin")
    finally:
        beam_pids = [pid for pid in (node.beam_pid for node in nodes) if pid is not None]
        stop_all(nodes)

    assert [pid for pid in beam_pids if pid_alive(pid)] == []
    assert find_node_pids(names) == []
    assert all(not node.is_running() for node in nodes)


def test_broker_node_picks_distinct_loopback_ports(tmp_path: Path) -> None:
    nodes = [BrokerNode(tmp_path / f"n{i}") for i in range(3)]
    ports = [p for node in nodes for p in (node.amqp_port, node.dist_port)]
    assert len(set(ports)) == len(ports)
    assert all(node.url.startswith("amqp://guest:guest@127.0.0.1:") for node in nodes)
