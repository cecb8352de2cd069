"""A real HTTP tracking receiver for sentinel-link tests and benchmarks: accepts `POST` of
JSON batches (`{"node", "records": [...]}`) and keeps every record it got, repeats included.
It can be taken down (the port refuses connections) and brought back on the same port, and it
can hold its answers (a slow receiver: a POST waits until `release()`)."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class TrackingSink:
    def __init__(self, port: int = 0) -> None:
        self.records: list[dict[str, Any]] = []
        self.batches = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.port = port
        self.waiting = 0  # POSTs held unanswered now
        self._answer = threading.Event()
        self._answer.set()
        self.start()

    def hold(self) -> None:
        """From now on, every POST waits for `release()` before it is answered."""
        self._answer.clear()

    def release(self) -> None:
        self._answer.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/track"

    def start(self) -> None:
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (the stdlib's name)
                length = int(self.headers.get("Content-Length", "0"))
                try:
                    doc = json.loads(self.rfile.read(length))
                    records = list(doc["records"])
                except (ValueError, KeyError, TypeError):
                    self.send_response(400)
                    self.end_headers()
                    return
                with sink._lock:
                    sink.records.extend(records)
                    sink.batches += 1
                    sink.waiting += 1
                sink._answer.wait()
                with sink._lock:
                    sink.waiting -= 1
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Down: the port refuses connections until `start()`."""
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def states(self) -> list[dict[str, Any]]:
        """Transfer-state records received, in arrival order, repeats included."""
        with self._lock:
            return [r for r in self.records if r.get("type") == "transfer_state"]

    def heartbeats(self) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if r.get("type") == "heartbeat"]

    def unique_states(self) -> dict[str, dict[str, Any]]:
        """By id, first arrival kept: what a receiver has after dropping repeats."""
        found: dict[str, dict[str, Any]] = {}
        for record in self.states():
            found.setdefault(record["id"], record)
        return found

    def by_cycle(self) -> dict[str, list[dict[str, Any]]]:
        """Unique records per cycle, in the order they arrived."""
        cycles: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for record in self.unique_states().values():
            cycles[record["cycle_id"]].append(record)
        return dict(cycles)
