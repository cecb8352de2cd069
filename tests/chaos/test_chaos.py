"""The chaos suite's short mode under pytest (marked `fault`): each fault once under load,
every invariant after each. The JSON report lands in the test's tmp_path (path printed)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psycopg2
import pytest

from tests.chaos.suite import Options, run
from tests.chaos.world import POSTGRES_DSN

pytestmark = [pytest.mark.fault, pytest.mark.timeout(600)]


def test_chaos_short(tmp_path: Path) -> None:
    if os.environ.get("FERRYLINK_CHAOS") == "0":
        pytest.skip("turned off (FERRYLINK_CHAOS=0)")
    if not shutil.which("rabbitmq-server"):
        pytest.skip("the chaos suite needs the installed rabbitmq-server")
    try:
        psycopg2.connect(POSTGRES_DSN + " dbname=postgres").close()
    except psycopg2.OperationalError as exc:
        pytest.skip(f"no PostgreSQL: {exc}")
    report_path = tmp_path / "chaos-report.json"
    report = run(Options(workdir=tmp_path / "world", keep=True), report_path)
    assert "error" not in report, report.get("traceback")
    broken = [
        (entry.get("fault", "final"), name, result)
        for entry in [*report["faults"], {"invariants": report["final"]}]
        for name, result in entry["invariants"].items()
        if not result.get("ok")
    ] + [(e["fault"], "fault", e["fault_error"]) for e in report["faults"] if not e["fault_ok"]]
    assert not broken, f"see {report_path}: {broken}"
    assert report["uploads"]["accepted"] > 0
