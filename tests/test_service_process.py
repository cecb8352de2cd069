"""A service process holds the runtime library and its own package, never the tooling
(the CLI, the local cluster runner, the private broker starter, test helpers): one
direction of imports, and memory that each of a server's processes would pay again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from ferrylink_ops.polling import wait_until
from ferrylink_ops.processes import port_free

TOOLING = ("ferrylink_ops", "pytest", "testcontainers")
# Imported on first use only (partner exchanges, partner secrets, forwarding to the primary,
# tracking deliveries, the web UI): an idle process does not pay for them (~20 MB in all).
ON_DEMAND = ("asyncssh", "cryptography", "httpx", "jinja2")
# What libraries would load for nothing (ferrylink.lean_imports keeps it out): FastAPI's check
# for Pydantic v1 models, uvicorn's command line, the compiler of the library caches.
LEFT_OUT = ("pydantic.v1", "click", "uvicorn.main", "uvicorn.supervisors", "compileall")
# Logged though refused (None in sys.modules): its own modules are never loaded.
REFUSED = {"pydantic.v1"}


def imported_modules(import_log: str) -> set[str]:
    """Module names the last interpreter of a -X importtime log imported.

    The log lines read "import time: self | cumulative | name". `ferrylink service` is one
    interpreter that execs another, and each imports `site` first at start-up, so the
    service's own imports are those from the last `site` on."""
    names: list[str] = []
    for line in import_log.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name == "site":
                names = []
            names.append(name)
    return set(names)


def test_a_service_process_imports_no_tooling(tmp_path: Path, amqp_url: str, prefix: str) -> None:
    port = next(p for p in range(23400, 23500) if port_free(p))
    env = {
        **os.environ,
        "FERRYLINK_AMQP_URL": amqp_url, "FERRYLINK_NAME_PREFIX": prefix,
        "FERRYLINK_HTTP_PORT": str(port), "FERRYLINK_STATE_DIR": str(tmp_path),
        "FERRYLINK_DATA_DIR": str(tmp_path / "data"),
        "PYTHONPROFILEIMPORTTIME": "1",  # every import, lazy ones too, logged on stderr
    }  # fmt: skip
    stderr_path = tmp_path / "stderr.log"
    with stderr_path.open("wb") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "ferrylink_ops.cli", "service", "transaction-manager"],
            env=env, stdout=subprocess.DEVNULL, stderr=stderr,
        )  # fmt: skip
        try:

            def ready() -> bool:
                try:
                    return httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).is_success
                except httpx.HTTPError:
                    return False

            wait_until(ready, 60, "the transaction manager to be ready")
            # exec, not a child: the pid we started is the service itself.
            cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes().split(b"\0")
            assert b"services.transaction_manager.main" in cmdline
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(30)
    modules = imported_modules(stderr_path.read_text(errors="replace"))
    assert {"services.transaction_manager.routing", "ferrylink.runtime"} <= modules
    held = sorted(m for m in modules if m.split(".")[0] in TOOLING)
    assert held == [], f"the service process imported tooling: {held}"
    idle = sorted({m.split(".")[0] for m in modules} & set(ON_DEMAND))
    assert idle == [], f"the idle service process imported what it loads on demand: {idle}"
    needless = sorted(
        m for m in modules - REFUSED if any(m == n or m.startswith(n + ".") for n in LEFT_OUT)
    )
    assert needless == [], f"the service process imported what it never uses: {needless}"
