"""The steady load: a thread uploading files through the edge's HTTPS port as the demo
account, remembering which uploads were accepted (2xx, with their event id)."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.cluster_support import Cluster


@dataclass
class Accepted:
    name: str
    event_id: str
    at: float


@dataclass
class UploadLoad:
    cluster: Cluster
    payload_dir: Path
    interval: float = 0.4  # seconds between uploads: the load's rate, not a synchronisation
    size: int = 16_384
    accepted: dict[str, Accepted] = field(default_factory=dict)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (name, status or error)
    attempts: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-load", daemon=True)
        self.payload_dir.mkdir(parents=True, exist_ok=True)

    def start(self) -> UploadLoad:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)

    def snapshot(self) -> dict[str, Accepted]:
        with self._lock:
            return dict(self.accepted)

    def count(self) -> tuple[int, int, int]:
        """(attempts, accepted, refused) so far."""
        with self._lock:
            return self.attempts, len(self.accepted), len(self.refused)

    def _run(self) -> None:
        demo = self.cluster.doc()["demo"]
        password = Path(demo["password_file"]).read_text().strip()
        base = f"https://127.0.0.1:{demo['https_port']}/files/"
        with httpx.Client(verify=demo["ca_file"], auth=("demo", password), timeout=30) as client:
            number = 0
            while not self._stop.wait(self.interval):
                number += 1
                name = f"u{number:05d}.dat"
                body = os.urandom(self.size)
                with self._lock:
                    self.attempts += 1
                try:
                    response = client.put(base + name, content=body)
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                else:
                    if 200 <= response.status_code < 300:
                        with self._lock:
                            self.accepted[name] = Accepted(
                                name, response.json()["event_id"], time.time()
                            )
                        continue
                    outcome = f"{response.status_code} {response.text[:200]}"
                with self._lock:
                    self.refused.append((name, outcome))
