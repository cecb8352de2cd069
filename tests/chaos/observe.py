"""Watching the cluster while faults run: every service's primary-only activations (kept
here, since a killed process takes its own history with it) and the (epoch, primary) pairs
the coordinators announce."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from ferrylink.cluster import PRIMARY_ONLY_WORK
from ferrylink.services_registry import BACKEND_SERVICES
from tests.cluster_support import Cluster


@dataclass
class Activation:
    server: str
    service: str
    unit: str
    epoch: int
    start: float
    end: float | None  # None: still active when last seen
    stopping: float | None = None  # when its process began to stop it

    def as_dict(self) -> dict[str, Any]:
        return {"server": self.server, "service": self.service, "unit": self.unit,
                "epoch": self.epoch, "start": self.start, "end": self.end,
                "stopping": self.stopping}  # fmt: skip

    def describe(self) -> str:
        stop = ""
        if self.stopping is not None and self.end is not None:
            stop = f", its stop took {self.end - self.stopping:.3f} s"
        return f"{self.unit}@{self.server} (epoch {self.epoch}{stop})"


@dataclass
class Freeze:
    server: str
    service: str
    stopped: float
    resumed: float


@dataclass
class Observer:
    cluster: Cluster
    servers: list[str]
    activations: dict[tuple[str, str, str, float], Activation] = field(default_factory=dict)
    epoch_primaries: dict[int, set[str]] = field(default_factory=dict)
    kills: list[tuple[str, str, float]] = field(default_factory=list)  # (server, service, at)
    freezes: list[Freeze] = field(default_factory=list)
    polls: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-observer", daemon=True)

    def start(self) -> Observer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def killed(self, server: str, services: list[str], at: float) -> None:
        """Processes we SIGKILLed: their open activations end at `at` (they cannot report)."""
        with self._lock:
            self.kills.extend((server, service, at) for service in services)
            for act in self.activations.values():
                open_before = act.end is None and act.start < at
                if act.server == server and act.service in services and open_before:
                    act.end = at

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.poll()

    def poll(self) -> None:
        """One look at every service's `/work` and at each coordinator's `/cluster`."""
        now = time.time()
        with httpx.Client(headers=self.cluster.http.headers, timeout=2) as client:
            ports = {(s["id"], name): svc["port"] for s in self.cluster.doc()["servers"]
                     for name, svc in s["services"].items()}  # fmt: skip
            for server in self.servers:
                for service in BACKEND_SERVICES:
                    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                        doc = client.get(f"http://127.0.0.1:{ports[(server, service)]}/work").json()
                        self._record(server, service, doc["history"], now)
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    view = client.get(
                        f"http://127.0.0.1:{ports[(server, 'cluster-coordinator')]}/cluster"
                    ).json()
                    if view.get("epoch") is not None and view.get("primary"):
                        with self._lock:
                            self.epoch_primaries.setdefault(int(view["epoch"]), set()).add(
                                str(view["primary"])
                            )
        self.polls += 1

    def _record(self, server: str, service: str, history: list[dict[str, Any]], now: float) -> None:
        with self._lock:
            for item in history:
                if item["unit"] not in PRIMARY_ONLY_WORK:
                    continue
                key = (server, service, item["unit"], float(item["start"]))
                known = self.activations.get(key)
                if known is None:
                    self.activations[key] = Activation(
                        server, service, item["unit"], int(item["epoch"]), float(item["start"]),
                        item["end"], item.get("stopping"),
                    )  # fmt: skip
                elif item["end"] is not None:
                    known.end = float(item["end"])
                    known.stopping = item.get("stopping")

    # ---- the checks on what was observed ----------------------------------------------

    def intervals(self) -> list[Activation]:
        now = time.time()
        with self._lock:
            return [
                Activation(
                    a.server,
                    a.service,
                    a.unit,
                    a.epoch,
                    a.start,
                    a.end if a.end is not None else now,
                    a.stopping,
                )  # fmt: skip
                for a in self.activations.values()
            ]

    def one_primary_per_epoch(self) -> dict[str, Any]:
        """No epoch with primary-only work on two servers, nor two primaries announced."""
        by_epoch: dict[int, set[str]] = {}
        for act in self.intervals():
            by_epoch.setdefault(act.epoch, set()).add(act.server)
        with self._lock:
            announced = {e: sorted(p) for e, p in self.epoch_primaries.items()}
        working = {e: sorted(s) for e, s in by_epoch.items()}
        bad = {e: s for e, s in working.items() if len(s) > 1}
        bad_announced = {e: p for e, p in announced.items() if len(p) > 1}
        return {
            "ok": not bad and not bad_announced,
            "epochs_seen": len(set(working) | set(announced)),
            "epochs_with_two_working_servers": bad,
            "epochs_with_two_announced_primaries": bad_announced,
        }

    def overlaps(self, wake_margin: float) -> dict[str, Any]:
        """Primary-only work of two servers at the same time. A process frozen by SIGSTOP
        did nothing while frozen: its interval is split around the freeze, and what it ran
        after waking up (before it noticed its grant had run out and fenced itself) is
        reported apart, bounded by `wake_margin` seconds. A woken process has fenced itself
        when its follower began to stop the work (`stopping`): from then on every check of
        its grant fails. What it does until the stop has returned is refused work and
        clean-up, and a side effect let through before the freeze (made harmless by
        idempotency; see fencing.py). A live process's interval ends only when its stop
        returned: a handover waits for that."""
        pieces: list[tuple[Activation, float, float, bool]] = []  # (act, start, end, woke)
        woke_late: list[dict[str, Any]] = []
        with self._lock:
            freezes = list(self.freezes)
        for act in self.intervals():
            assert act.end is not None
            spans = [(act.start, act.end, False)]
            for freeze in freezes:
                if (freeze.server, freeze.service) != (act.server, act.service):
                    continue
                next_spans = []
                for start, end, woke in spans:
                    if start < freeze.stopped < end or start < freeze.resumed < end:
                        if start < freeze.stopped:
                            next_spans.append((start, freeze.stopped, woke))
                        if end > freeze.resumed:
                            next_spans.append((max(start, freeze.resumed), end, True))
                    else:
                        next_spans.append((start, end, woke))
                spans = next_spans
            for start, span_end, woke in spans:
                end = span_end
                if woke and act.stopping is not None and start < act.stopping < end:
                    end = act.stopping
                pieces.append((act, start, end, woke))
                if woke and end - start > wake_margin:
                    woke_late.append({**act.as_dict(), "ran_after_wake_s": round(end - start, 3)})
        strict: list[str] = []
        after_wake: list[dict[str, Any]] = []
        for i, (a, a_start, a_end, a_woke) in enumerate(pieces):
            for b, b_start, b_end, b_woke in pieces[i + 1 :]:
                if a.server == b.server:
                    continue
                overlap = min(a_end, b_end) - max(a_start, b_start)
                if overlap <= 0:
                    continue
                text = f"{a.describe()} and {b.describe()} overlap {overlap:.3f} s"
                if a_woke or b_woke:
                    after_wake.append({"overlap": text, "seconds": round(overlap, 3)})
                else:
                    strict.append(text)
        return {
            "ok": not strict and not woke_late,
            "activations": len(pieces),
            "overlaps": strict[:20],
            "overlap_count": len(strict),
            "after_wake_overlaps": after_wake[:20],
            "ran_after_wake_longer_than_margin": woke_late,
        }
