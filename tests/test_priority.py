"""The sentinel link's lower CPU priority (ferrylink.priority) in real child processes: a
session leader lowers its own autogroup too; a process sharing its session with others
lowers only itself (its session's autogroup would slow them all)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

CHILD = """
import json, os, threading
from pathlib import Path
from ferrylink.priority import lower_cpu_priority
seen = {}
started = threading.Event()
release = threading.Event()
def before():  # a thread that was running already
    started.set()
    release.wait()
    seen["before"] = os.nice(0)
def after():
    seen["after"] = os.nice(0)
old = threading.Thread(target=before)
old.start()
started.wait()
done = lower_cpu_priority(7)
release.set()
old.join()
new = threading.Thread(target=after)
new.start()
new.join()
# Empty for a process in the root group (the session of PID 1): no autogroup of its own.
words = Path("/proc/self/autogroup").read_text().split()
print(json.dumps({"done": done, "nice": os.nice(0), "threads": [seen["before"], seen["after"]],
                  "autogroup": words[-1] if words else None}))
"""

needs_autogroups = pytest.mark.skipif(
    not Path("/proc/self/autogroup").exists(), reason="no autogroups on this kernel"
)


def autogroup_nice(text: str) -> str | None:
    """The nice value in a /proc/<pid>/autogroup text ("/autogroup-85 nice 0"); None for
    the empty text of a process in the root group, as in CI when the test runner shares
    PID 1's session (seen in CI: the child's own read raised IndexError)."""
    words = text.split()
    return words[-1] if words else None


def run_child(own_session: bool) -> dict[str, object]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                            env=env, timeout=60, start_new_session=own_session)  # fmt: skip
    # What the child printed on stderr is the whole story when it fails (seen once in CI).
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    found: dict[str, object] = json.loads(result.stdout)
    return found


@needs_autogroups
def test_a_session_leader_lowers_itself_and_its_autogroup() -> None:
    assert run_child(own_session=True) == {
        "done": ["nice 7", "autogroup nice 7"], "nice": 7, "threads": [7, 7], "autogroup": "7"
    }  # fmt: skip


@needs_autogroups
def test_a_process_in_a_shared_session_leaves_the_autogroup_alone() -> None:
    ours = Path("/proc/self/autogroup").read_text()
    child = run_child(own_session=False)
    assert child == {
        "done": ["nice 7"],
        "nice": 7,
        "threads": [7, 7],
        "autogroup": autogroup_nice(ours),
    }
    assert Path("/proc/self/autogroup").read_text() == ours


def test_a_refused_thread_is_reported_not_raised(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Where a sandbox refuses setpriority, the service starts anyway and says so. In this
    process, so nothing real may change: both the call and the autogroup are stand-ins."""
    from ferrylink import priority

    def refuse(which: int, who: int, value: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(priority.os, "setpriority", refuse)
    monkeypatch.setattr(priority, "AUTOGROUP", tmp_path / "autogroup")
    before = os.nice(0)
    done = priority.lower_cpu_priority(19)
    assert done[0].startswith("nice 19 on 0 of ") and done[0].endswith(" threads"), done
    assert os.nice(0) == before
