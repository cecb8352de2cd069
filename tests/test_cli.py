"""Fast tests of `ferrylink`'s argument handling and of what needs no running cluster."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from ferrylink.services_registry import BACKEND_SERVICES
from ferrylink_ops.cli import main
from ferrylink_ops.local_cluster import (
    ClusterError,
    LocalCluster,
    format_table,
    service_port,
)


@pytest.fixture(autouse=True)
def no_real_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests must never start a cluster, even when an argv turns out to be valid."""
    import ferrylink_ops.supervisor as supervisor

    def refuse(*_args: object, **_kwargs: object) -> int:
        raise AssertionError("a fast CLI test tried to start a cluster")

    monkeypatch.setattr(supervisor.Supervisor, "run", refuse)
    monkeypatch.setattr(supervisor, "start_detached", refuse)


def exit_code(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert isinstance(info.value.code, int)
    return info.value.code


def fake_cluster_json(state_dir: Path, dead_pid: int) -> None:
    """A cluster.json for st1, st2 whose processes are gone."""
    state_dir.mkdir(parents=True, exist_ok=True)
    servers: list[dict[str, Any]] = [
        {
            "id": server_id,
            "state": "up",
            "api_url": f"http://127.0.0.1:{service_port(39000, i, 0)}",
            "services": {
                name: {"pid": dead_pid, "port": service_port(39000, i, j), "running": True}
                for j, name in enumerate(BACKEND_SERVICES)
            },
        }
        for i, server_id in enumerate(("st1", "st2"))
    ]
    doc = {
        "mode": "passive",
        "amqp_url": "amqp://guest:***@127.0.0.1:5672/%2F",
        "database_url": f"sqlite:///{state_dir / 'ferrylink.db'}",
        "servers": servers,
        "edges": [],
        "status": "running",
        "supervisor_pid": dead_pid,
    }
    (state_dir / "cluster.json").write_text(json.dumps(doc))


@pytest.fixture
def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_bad_mode_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(["up", "--servers", "2", "--mode", "active_passive"]) == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'active_passive'" in err
    assert "passive_legacy" in err


def test_bad_mode_exits_2_from_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ferrylink_ops.cli", "up", "--mode", "nope"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--mode" in result.stderr and "invalid choice" in result.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["up", "--servers", "0"], "must be between 1 and"),
        (["up", "--servers", "three"], "not a number"),
        (["up", "--base-port", "70000"], "not a port"),
        (["up", "--servers", "3", "--base-port", "65530"], "leaves no room"),
        (["up", "--prefix", "bad name"], "--prefix"),
        (["service", "no-such-service"], "invalid choice"),
        (["server", "reboot", "st1"], "invalid choice"),
        (["server", "stop"], "required"),
        ([], "required"),
    ],
)
def test_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert exit_code(argv) == 2
    assert message in capsys.readouterr().err


def test_unknown_server_id_is_a_clear_error(
    tmp_path: Path, dead_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_cluster_json(tmp_path, dead_pid)
    for action in ("stop", "start", "kill"):
        assert main(["server", action, "st9", "--state-dir", str(tmp_path)]) == 1
        err = capsys.readouterr().err
        assert "unknown server 'st9'" in err and "st1, st2" in err


def test_server_commands_need_a_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "stop", "st1", "--state-dir", str(tmp_path)]) == 1
    assert "no cluster in" in capsys.readouterr().err
    assert main(["status", "--state-dir", str(tmp_path)]) == 1
    assert "ferrylink up" in capsys.readouterr().err


def test_start_without_supervisor_says_so(
    tmp_path: Path, dead_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_cluster_json(tmp_path, dead_pid)
    assert main(["server", "start", "st2", "--state-dir", str(tmp_path)]) == 1
    assert "no supervisor runs" in capsys.readouterr().err


def test_kill_without_supervisor_marks_the_server_down(
    tmp_path: Path, dead_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    fake_cluster_json(tmp_path, dead_pid)
    assert main(["server", "kill", "st2", "--state-dir", str(tmp_path)]) == 0
    doc = json.loads((tmp_path / "cluster.json").read_text())
    assert [s["state"] for s in doc["servers"]] == ["up", "down"]


def test_down_and_status_of_a_dead_cluster(
    tmp_path: Path, dead_pid: int, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["down", "--state-dir", str(empty)]) == 0
    assert "no cluster runs here" in capsys.readouterr().out

    state_dir = tmp_path / "state"
    fake_cluster_json(state_dir, dead_pid)
    assert main(["status", "--state-dir", str(state_dir)]) == 0
    out = capsys.readouterr().out
    assert "mode: passive" in out
    rows = [line.split() for line in out.splitlines() if line.startswith("st")]
    assert len(rows) == 2 * len(BACKEND_SERVICES)
    assert all(row[-2:] == ["no", "no"] for row in rows)  # alive, ready

    assert main(["down", "--state-dir", str(state_dir)]) == 0
    doc = json.loads((state_dir / "cluster.json").read_text())
    assert doc["status"] == "stopped"
    assert all(s["state"] == "down" for s in doc["servers"])


def test_cluster_layout_and_environment(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path, 2, "passive_legacy", base_port=9000, prefix="fl-x")
    doc = cluster.to_json()
    assert doc["mode"] == "passive_legacy"
    assert doc["edges"] == []
    assert "***" in doc["amqp_url"] or "@" not in doc["amqp_url"]
    assert doc["database_url"] == f"sqlite:///{tmp_path.resolve() / 'ferrylink.db'}"
    assert [s["id"] for s in doc["servers"]] == ["st1", "st2"]
    st1, st2 = doc["servers"]
    assert st1["services"]["cluster-coordinator"]["port"] == 9001
    assert st2["services"]["sentinel-link"]["port"] == 9015
    assert st2["api_url"] == "http://127.0.0.1:9011"
    assert st1["state"] == "down" and st1["services"]["scheduler"]["pid"] is None

    proc = cluster.server("st2").services["scheduler"]
    env = cluster.environment(proc)
    assert env["FERRYLINK_NODE_ID"] == "st2"
    assert env["FERRYLINK_HTTP_PORT"] == "9013"
    assert env["FERRYLINK_NAME_PREFIX"] == "fl-x"
    assert env["FERRYLINK_CLUSTER_MODE"] == "passive_legacy"
    assert env["FERRYLINK_DATABASE_URL"] == doc["database_url"]
    assert env["FERRYLINK_DATA_DIR"] == str(tmp_path.resolve() / "data")
    assert proc.log_path == tmp_path.resolve() / "logs" / "st2-scheduler.log"

    with pytest.raises(ClusterError, match="unknown server 'st3'"):
        cluster.server("st3")
    with pytest.raises(ClusterError, match="unknown mode"):
        LocalCluster(tmp_path, 1, "hot_standby")


def test_format_table() -> None:
    table = format_table(("a", "bb"), [[1, None], ["long", "x"]]).splitlines()
    assert table == ["a     bb", "----  --", "1", "long  x"]


def test_service_execs_the_service_module(monkeypatch: pytest.MonkeyPatch) -> None:
    """`ferrylink service NAME` replaces itself with `python -m services.<name>.main`."""
    import ferrylink_ops.cli as cli

    calls: list[tuple[str, list[str]]] = []
    monkeypatch.setattr(cli.os, "execve", lambda path, argv, _env: calls.append((path, list(argv))))
    main(["service", "scheduler"])
    assert calls == [(sys.executable, [sys.executable, "-m", "services.scheduler.main"])]


def test_status_shows_the_coordinators_view(
    tmp_path: Path,
    dead_pid: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import ferrylink_ops.commands as commands

    view = {
        "mode": "passive",
        "epoch": 7,
        "primary": "st2",
        "leader": "st2",
        "servers": [
            {"id": "st1", "state": "down", "role": "standby", "synchronized": False},
            {"id": "st2", "state": "up", "role": "primary", "synchronized": True},
        ],
    }
    monkeypatch.setattr(commands, "coordinator_view", lambda _doc: view)
    fake_cluster_json(tmp_path, dead_pid)
    assert main(["status", "--state-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "primary: st2  epoch: 7" in out
    header = next(line for line in out.splitlines() if line.startswith("server"))
    assert header.split()[:6] == ["server", "state", "role", "seen", "as", "synced"]
    st2_rows = [line.split() for line in out.splitlines() if line.startswith("st2")]
    assert all(row[2:5] == ["primary", "up", "yes"] for row in st2_rows)


def test_per_server_environment_overrides_and_database_url(tmp_path: Path) -> None:
    database = "postgresql+psycopg2://postgres@127.0.0.1/shared"
    cluster = LocalCluster(tmp_path, 2, "passive", base_port=9000, database_url=database)
    assert cluster.to_json()["database_url"] == database
    (tmp_path / "env").mkdir()
    (tmp_path / "env" / "st2.env").write_text(
        "# st2 reaches the broker and the database through its own proxies\n\n"
        "FERRYLINK_AMQP_URL=amqp://guest:guest@127.0.0.1:7001/%2F\n"
        "FERRYLINK_DATABASE_URL = postgresql+psycopg2://postgres@127.0.0.1:7002/shared\n"
    )
    st1 = cluster.environment(cluster.server("st1").services["scheduler"])
    st2 = cluster.environment(cluster.server("st2").services["scheduler"])
    assert st1["FERRYLINK_DATABASE_URL"] == database
    assert st2["FERRYLINK_DATABASE_URL"] == "postgresql+psycopg2://postgres@127.0.0.1:7002/shared"
    assert st2["FERRYLINK_AMQP_URL"] == "amqp://guest:guest@127.0.0.1:7001/%2F"
    assert st2["FERRYLINK_NODE_ID"] == "st2"  # the rest is the runner's

    (tmp_path / "env" / "st1.env").write_text("FERRYLINK_AMQP_URL amqp://x\n")
    with pytest.raises(ClusterError, match=r"st1\.env:1: expected KEY=VALUE"):
        cluster.environment(cluster.server("st1").services["scheduler"])
