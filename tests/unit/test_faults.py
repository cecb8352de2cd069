"""The test-only fault hook (ferrylink.faults) in a child process: it acts at its point's
first passage, or with FERRYLINK_FAULT_MIN_BATCH only at one in a batch that large."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

CHILD = """
from ferrylink.faults import fault_point
for batch in (1, 1, 3, 5):
    print(f"before {batch}", flush=True)
    fault_point("after-plan", batch)
    fault_point("elsewhere", batch)
print("survived", flush=True)
"""


def run_child(**env: str) -> tuple[int, list[str]]:
    result = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env),
                            timeout=60)  # fmt: skip
    return result.returncode, result.stdout.split("\n")[:-1]


@pytest.mark.parametrize(
    ("env", "code", "last"),
    [
        ({}, 0, "survived"),  # no point: nothing happens
        ({"FERRYLINK_FAULT_POINT": "after-plan"}, -signal.SIGKILL, "before 1"),
        ({"FERRYLINK_FAULT_POINT": "after-plan", "FERRYLINK_FAULT_MIN_BATCH": "2"},
         -signal.SIGKILL, "before 3"),  # the first passage in a batch of at least two
        ({"FERRYLINK_FAULT_POINT": "after-plan", "FERRYLINK_FAULT_MIN_BATCH": "9"}, 0, "survived"),
    ],
)  # fmt: skip
def test_the_point_acts_at_its_first_passage_in_a_large_enough_batch(
    env: dict[str, str], code: int, last: str
) -> None:
    env = {"FERRYLINK_FAULT_POINT": "", **env}
    returncode, lines = run_child(**env)
    assert (returncode, lines[-1]) == (code, last), lines
