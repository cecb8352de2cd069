"""Telling a recorded pid's process from a later one given the same pid (pid reuse), before
the tooling signals it: `started_for` (the environment's mark), `start_time`, and the
supervisor's pid file (ferrylink_ops.processes, ferrylink_ops.local_cluster)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ferrylink_ops.local_cluster import (
    running_supervisor,
    supervisor_pid_file,
    write_supervisor_pid,
)
from ferrylink_ops.processes import start_time, started_for

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs /proc")


def started(env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A sleeping child, returned once it runs its own program: until its exec, its
    /proc environ is still the parent's (seen under load)."""
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)"],
        env=env, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None and process.stdout.readline() == b"up\n"
    return process


@pytest.fixture
def child(tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A process started for the cluster in tmp_path/cluster."""
    process = started(dict(os.environ, FERRYLINK_STATE_DIR=str(tmp_path / "cluster")))
    yield process
    process.kill()
    process.wait()


@pytest.mark.parametrize(
    ("directory", "belongs"),
    [
        ("cluster", True),
        ("cluster/../cluster", True),  # the same directory, spelled otherwise
        ("other", False),  # another cluster's directory
        ("clust", False),  # a prefix of the name is not the directory
        ("cluster/broker", False),  # a directory under it is not the one it names
        (".", False),  # nor is a directory above it (a cluster nested in another's)
    ],
)
def test_a_process_belongs_to_the_directory_its_environment_names(
    child: subprocess.Popen[bytes], tmp_path: Path, directory: str, belongs: bool
) -> None:
    (tmp_path / "cluster").mkdir(exist_ok=True)
    assert started_for(child.pid, "FERRYLINK_STATE_DIR", tmp_path / directory) is belongs


def test_a_path_under_the_directory_belongs_to_it(tmp_path: Path) -> None:
    """The private broker's mark: its mnesia directory under the cluster's broker folder."""
    env = dict(os.environ, RABBITMQ_MNESIA_BASE=str(tmp_path / "broker" / "node" / "mnesia"))
    process = started(env)
    try:
        assert started_for(process.pid, "RABBITMQ_MNESIA_BASE", tmp_path / "broker", under=True)
        assert not started_for(process.pid, "RABBITMQ_MNESIA_BASE", tmp_path / "broker")
        assert not started_for(process.pid, "RABBITMQ_MNESIA_BASE", tmp_path / "other", under=True)
        assert not started_for(process.pid, "FERRYLINK_STATE_DIR", tmp_path / "broker")
    finally:
        process.kill()
        process.wait()


def test_an_ended_process_belongs_nowhere_and_has_no_start_time(
    child: subprocess.Popen[bytes], tmp_path: Path
) -> None:
    child.kill()
    child.wait()
    assert not started_for(child.pid, "FERRYLINK_STATE_DIR", tmp_path / "cluster")
    assert start_time(child.pid) is None


def test_start_times_tell_processes_apart(child: subprocess.Popen[bytes]) -> None:
    mine = start_time(os.getpid())
    assert mine is not None and mine == start_time(os.getpid())
    theirs = start_time(child.pid)
    assert theirs is not None and theirs >= mine


def test_the_supervisor_pid_file_names_one_process(tmp_path: Path) -> None:
    """This process as the supervisor: found while the file's start time is its own; a file
    whose pid is this process's but whose start time is another's (the supervisor died and
    the pid was given to this process) names no supervisor."""
    write_supervisor_pid(tmp_path)
    assert running_supervisor(tmp_path) == os.getpid()
    pid_file = supervisor_pid_file(tmp_path)
    pid, started = pid_file.read_text().split()
    pid_file.write_text(f"{pid}\n{int(started) - 1}\n")
    assert running_supervisor(tmp_path) is None
