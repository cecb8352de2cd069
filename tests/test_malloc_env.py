"""Every service process gets the glibc malloc settings of `MALLOC_ENV` (unless its
environment sets its own), whichever way it starts: the local runner, `ferrylink service`,
the container image."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ferrylink.services_registry import MALLOC_ENV
from ferrylink_ops import cli
from ferrylink_ops.local_cluster import LocalCluster

DOCKERFILE = Path(__file__).resolve().parent.parent / "deploy" / "Dockerfile"


def test_the_settings_are_the_ones_measured() -> None:
    assert MALLOC_ENV == {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_ARENA_MAX": "2"}


def test_the_local_runner_gives_them_to_every_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")  # the operator's own value wins
    cluster = LocalCluster(tmp_path, 1, "active_active", edges=1)
    for proc in cluster.processes():
        env = cluster.environment(proc)
        assert env["MALLOC_MMAP_THRESHOLD_"] == "131072", proc.service
        assert env["MALLOC_ARENA_MAX"] == "4", proc.service


def test_ferrylink_service_execs_the_service_with_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    execs: list[tuple[list[str], dict[str, str]]] = []

    def fake_execve(_path: str, argv: list[str], env: dict[str, str]) -> None:
        execs.append((argv, env))

    monkeypatch.setattr(cli.os, "execve", fake_execve)
    cli.main(["service", "scheduler"])
    [(argv, env)] = execs
    assert argv[-2:] == ["-m", "services.scheduler.main"]
    assert {k: env[k] for k in MALLOC_ENV} == MALLOC_ENV


def test_the_container_image_sets_them() -> None:
    text = DOCKERFILE.read_text()
    found = dict(re.findall(r"\b(MALLOC_[A-Z_]+)=(\S+)", text))
    assert found == MALLOC_ENV
