"""The chaos suite: faults in turn under a steady upload load, invariants after each, a JSON
report. Entry points: `python -m tests.chaos` and tests/chaos/test_chaos.py."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from ferrylink.cluster import WORK_SCHEDULER
from ferrylink.contracts import transfer_state_id
from ferrylink.services_registry import BACKEND_SERVICES
from ferrylink_ops.polling import WaitTimeout, wait_until
from ferrylink_ops.processes import wait_pids_gone
from tests.chaos.load import Accepted, UploadLoad
from tests.chaos.observe import Freeze, Observer
from tests.chaos.world import SERVERS, World
from tests.cluster_support import readyz

CONNECTION_TIMEOUT = 5.0  # the coordinator's default
LEASE = 3.0  # the coordinator's default grant/lease
FAULTS = ["kill_service", "kill_primary", "freeze", "kill_broker_node", "partition"]


@dataclass
class Bounds:
    """Deadlines of the checks (seconds). Generous: 2 shared cores run ~20 processes."""

    recovery: float = 120.0  # every service ready and the cluster settled again
    delivery: float = 120.0  # every accepted upload at the partner, logged and tracked
    failover: float = 30.0  # another primary working after the primary is lost
    wake_margin: float = 1.0  # a frozen process must fence itself this soon after waking


@dataclass
class Options:
    long: bool = False
    mode: str = "active_active"
    rounds: int = 0  # 0: one round (short), three rounds in random order (long)
    seed: int = 0
    workdir: Path | None = None
    keep: bool = False
    bounds: Bounds = field(default_factory=Bounds)
    upload_interval: float = 0.4


class Chaos:
    def __init__(self, world: World, load: UploadLoad, observer: Observer, options: Options,
                 rng: random.Random) -> None:  # fmt: skip
        self.world = world
        self.cluster = world.cluster
        assert self.cluster is not None
        self.load = load
        self.observer = observer
        self.options = options
        self.bounds = options.bounds
        self.rng = rng
        self.broken_before: set[str] = set()
        self.checking = ""  # the invariant being checked

    # ---- looking at the cluster --------------------------------------------------------

    def view(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """GET /cluster from the first coordinator that answers with it (a server cut off
        the database answers 500: its admin-token check needs the database)."""
        assert self.cluster is not None
        for server in SERVERS:
            if server in exclude:
                continue
            with contextlib.suppress(httpx.HTTPError, ValueError):
                view = self.cluster.get(server, "cluster-coordinator", "/cluster")
                if isinstance(view, dict) and "servers" in view:
                    return view
        raise AssertionError("no coordinator answers")

    def primary(self) -> str:
        primary = self.view()["primary"]
        assert primary, "no primary"
        return str(primary)

    def working_primary(self, exclude: tuple[str, ...] = ()) -> str | None:
        """The primary the other servers see, once its scheduler runs."""
        assert self.cluster is not None
        try:
            primary = self.view(exclude)["primary"]
            if primary and primary not in exclude:
                active = self.cluster.active(primary, "scheduler")
                return str(primary) if WORK_SCHEDULER in active else None
        except (AssertionError, httpx.HTTPError, ValueError):
            return None
        return None

    def settled(self) -> bool:
        """Every server up and the first one primary again, its scheduler running."""
        try:
            view = self.view()
        except (AssertionError, httpx.HTTPError):
            return False
        return all(s["state"] == "up" for s in view["servers"]) and (
            self.working_primary() == SERVERS[0]
        )

    # ---- faults ------------------------------------------------------------------------

    def kill_service(self) -> dict[str, Any]:
        """SIGKILL one backend service process of a random server; start it again."""
        assert self.cluster is not None
        server = self.rng.choice(SERVERS)
        service = self.rng.choice(BACKEND_SERVICES)
        pid = self.world.pid(server, service)
        os.kill(pid, signal.SIGKILL)
        self.observer.killed(server, [service], time.time())
        assert not wait_pids_gone([pid], 10), f"{server} {service} survived SIGKILL"
        began = time.monotonic()
        self.cluster.run("server", "start", server)
        return {"target": f"{server}/{service}", "restart_s": round(time.monotonic() - began, 2)}

    def kill_primary(self) -> dict[str, Any]:
        """SIGKILL every process of the primary; another takes over; start it again."""
        assert self.cluster is not None
        primary = self.primary()
        self.cluster.run("server", "kill", primary)
        killed_at = time.monotonic()  # the CLI returns once every process of it is gone
        self.observer.killed(primary, list(BACKEND_SERVICES), time.time())
        successor = wait_until(lambda: self.working_primary((primary,)), self.bounds.failover,
                               "another primary working")  # fmt: skip
        failover = time.monotonic() - killed_at
        began = time.monotonic()
        self.cluster.run("server", "start", primary)
        restart = time.monotonic() - began
        wait_until(self.settled, self.bounds.recovery, "fail-back to the first server")
        return {"target": primary, "successor": successor, "failover_s": round(failover, 2),
                "restart_s": round(restart, 2),
                "failback_s": round(time.monotonic() - began, 2)}  # fmt: skip

    def freeze(self) -> dict[str, Any]:
        """SIGSTOP a primary-only process of the primary past its grant (until another
        server works as primary), then SIGCONT."""
        primary = self.primary()
        service = self.rng.choice(["scheduler", "sentinel-link"])
        pid = self.world.pid(primary, service)
        stopped_wall, stopped = time.time(), time.monotonic()
        os.kill(pid, signal.SIGSTOP)
        try:
            successor = wait_until(
                lambda: self.working_primary((primary,)), self.bounds.failover,
                "another primary while frozen",
            )  # fmt: skip
            failover = time.monotonic() - stopped
            # Past the grant for sure, whatever the promotion took.
            frozen_for = time.monotonic() - stopped
            if frozen_for < LEASE + 1:
                wait_until(lambda: time.monotonic() - stopped >= LEASE + 1, LEASE + 2, "the grant")
        finally:
            os.kill(pid, signal.SIGCONT)
            resumed_wall = time.time()
            self.observer.freezes.append(Freeze(primary, service, stopped_wall, resumed_wall))
        frozen = time.monotonic() - stopped
        began = time.monotonic()
        wait_until(self.settled, self.bounds.recovery, "fail-back after the freeze")
        return {"target": f"{primary}/{service}", "successor": successor,
                "failover_s": round(failover, 2), "frozen_s": round(frozen, 2),
                "failback_s": round(time.monotonic() - began, 2)}  # fmt: skip

    def kill_broker_node(self) -> dict[str, Any]:
        """SIGKILL a RabbitMQ node under load; uploads go on; restart it, it rejoins."""
        index = 0 if not self.options.long else self.rng.randrange(len(self.world.brokers))
        node = self.world.brokers[index]
        node.kill()
        killed_at = time.monotonic()
        before = self.load.count()[1]
        # Progress without the node: uploads accepted and delivered to the partner.
        wait_until(lambda: self.load.count()[1] >= before + 5, self.bounds.failover,
                   "uploads accepted while a broker node is down")  # fmt: skip
        recent = self.load.snapshot()
        wait_until(lambda: set(recent) <= self.delivered_names(), self.bounds.delivery,
                   "deliveries while a broker node is down")  # fmt: skip
        down_for = time.monotonic() - killed_at
        began = time.monotonic()
        node.restart()
        seed = next(n for n in self.world.brokers if n is not node)
        names = sorted(n.name for n in self.world.brokers)
        wait_until(lambda: seed.running_nodes() == names, self.bounds.recovery,
                   "the node back in the cluster", interval=1.0)  # fmt: skip
        return {"target": node.name, "down_s": round(down_for, 2),
                "accepted_while_down": len(recent) - before,
                "rejoin_s": round(time.monotonic() - began, 2)}  # fmt: skip

    def partition(self) -> dict[str, Any]:
        """Cut the primary off the brokers, the database and the edge; heal it. Its APIs
        need the database (admin tokens), so what it did while cut off is read from its
        activation history after healing."""
        target = self.primary()
        links = self.world.links[target]
        cut_wall, cut_at = time.time(), time.monotonic()
        links.cut()
        try:
            successor = wait_until(
                lambda: self.working_primary((target,)), self.bounds.failover,
                "another primary during the cut",
            )  # fmt: skip
            failover = time.monotonic() - cut_at
        finally:
            links.heal()
        healed_at = time.monotonic()
        wait_until(self.settled, self.bounds.recovery, "fail-back after the partition")
        failback = time.monotonic() - healed_at
        self.observer.poll()
        acts = self.observer.intervals()
        cut_off = [a.end for a in acts if a.server == target and a.start < cut_wall]
        took_over = [a.start for a in acts if a.server == successor and a.start > cut_wall]
        fenced_at = max((e for e in cut_off if e is not None), default=cut_wall)
        return {"target": target, "successor": successor, "failover_s": round(failover, 2),
                "fenced_s": round(fenced_at - cut_wall, 2),
                "successor_started_s": round(min(took_over, default=cut_wall) - cut_wall, 2),
                "failback_s": round(failback, 2)}  # fmt: skip

    # ---- invariants --------------------------------------------------------------------

    def deadline(self) -> float:
        """The delivery bound; a sixth of it for an invariant an earlier check already found
        broken (what was missing then stays missing: the report says so, the run goes on)."""
        full = self.bounds.delivery
        return full / 6 if self.checking in self.broken_before else full

    def delivered_names(self) -> set[str]:
        assert self.world.sink is not None
        return {r.path.lstrip("/") for r in self.world.sink.requests
                if r.method == "PUT" and r.status == 201}  # fmt: skip

    def check(self) -> dict[str, dict[str, Any]]:
        """Every invariant, each polled with its own deadline; results by name."""
        results: dict[str, dict[str, Any]] = {}
        checks: list[tuple[str, Callable[[dict[str, Accepted]], dict[str, Any]]]] = [
            ("services_ready", self._services_ready),
            ("cluster_settled", self._cluster_settled),
            ("delivered_exactly_once", self._delivered_once),
            ("transfer_log_consistent", self._transfer_log),
            ("tracking_consistent", self._tracking),
        ]
        accepted = self.load.snapshot()
        for name, check in checks:
            self.checking = name
            began = time.monotonic()
            try:
                result = check(accepted)
            except WaitTimeout as exc:
                result = {"ok": False, "detail": str(exc)}
            except Exception as exc:  # a check that crashes is a failed check, not a crash
                result = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"}
            result["seconds"] = round(time.monotonic() - began, 2)
            results[name] = result
            if not result["ok"]:
                self.broken_before.add(name)
        self.observer.poll()
        results["one_primary_per_epoch"] = self.observer.one_primary_per_epoch()
        results["no_overlapping_primary_work"] = self.observer.overlaps(self.bounds.wake_margin)
        return results

    def _services_ready(self, _accepted: dict[str, Accepted]) -> dict[str, Any]:
        ports = self.world.ports()
        pending = set(ports)

        def done() -> bool:
            pending.difference_update({p for p in list(pending) if readyz(p) == 200})
            return not pending

        try:
            wait_until(done, self.bounds.recovery, "/readyz 200", interval=0.5)
        except WaitTimeout:
            return {"ok": False, "not_ready_ports": sorted(pending)}
        return {"ok": True, "services": len(ports)}

    def _cluster_settled(self, _accepted: dict[str, Accepted]) -> dict[str, Any]:
        try:
            wait_until(self.settled, self.bounds.recovery, "the cluster settled", interval=0.5)
        except WaitTimeout:
            try:
                view = self.view()
                servers = [(s["id"], s["state"], s["role"]) for s in view["servers"]]
                shown = {"primary": view["primary"], "epoch": view["epoch"], "servers": servers}
            except (AssertionError, httpx.HTTPError) as exc:
                shown = {"error": str(exc)}
            return {"ok": False, "view": shown}
        view = self.view()
        return {"ok": True, "primary": view["primary"], "epoch": view["epoch"]}

    def _delivered_once(self, accepted: dict[str, Accepted]) -> dict[str, Any]:
        assert self.world.sink is not None
        archive = self.world.workdir / "state" / "data" / "archive"
        with_deadline = True
        try:
            wait_until(lambda: set(accepted) <= self.delivered_names(), self.deadline(),
                       "every accepted upload at the partner", interval=0.5)  # fmt: skip
        except WaitTimeout:
            with_deadline = False
        puts = Counter(r.path.lstrip("/") for r in self.world.sink.requests
                       if r.method == "PUT" and r.status == 201)  # fmt: skip
        missing = sorted(set(accepted) - set(puts))
        twice = sorted(n for n, c in puts.items() if c > 1)
        not_archived = sorted(n for n in accepted if not (archive / n).is_file())
        return {
            "ok": with_deadline and not missing and not twice and not not_archived,
            "accepted": len(accepted),
            "delivered": len(puts),
            "delivered_not_acknowledged": len(set(puts) - set(self.load.snapshot())),
            "missing": missing[:20],
            "missing_count": len(missing),
            "delivered_twice": twice[:20],
            "delivered_twice_count": len(twice),
            "not_archived": not_archived[:20],
        }

    def _push_rows(self, event_ids: list[str]) -> list[tuple[Any, ...]]:
        return self.world.query(
            "SELECT event_id, leg_key, leg, status, file_name, revision FROM transfer "
            "WHERE event_id = ANY(%s)", event_ids)  # fmt: skip

    def _transfer_log(self, accepted: dict[str, Accepted]) -> dict[str, Any]:
        ids = [a.event_id for a in accepted.values()]

        def complete() -> bool:
            rows = self._push_rows(ids)
            sent = {r[0] for r in rows if r[2].startswith("push:") and r[3] == "SENT"}
            return set(ids) <= sent

        with_deadline = True
        try:
            wait_until(complete, self.deadline(), "a SENT push leg for every upload",
                       interval=1.0)  # fmt: skip
        except WaitTimeout:
            with_deadline = False
        rows = self._push_rows(ids)
        pushes = Counter(r[0] for r in rows if r[2].startswith("push:") and r[3] == "SENT")
        routed = Counter(r[0] for r in rows if r[2] == "route" and r[3] == "ROUTED")
        names = {r[0]: r[4] for r in rows if r[2].startswith("push:")}
        wrong_name = sorted(a.name for a in accepted.values()
                            if a.event_id in names and names[a.event_id] != a.name)  # fmt: skip
        not_one = sorted(a.name for a in accepted.values() if pushes[a.event_id] != 1)
        not_routed = sorted(a.name for a in accepted.values() if routed[a.event_id] != 1)
        failed = sorted({r[1] for r in rows if r[3] == "FAILED"})
        return {
            "ok": with_deadline and not not_one and not not_routed and not wrong_name,
            "legs": len(rows),
            "not_one_sent_push": not_one[:20],
            "not_one_sent_push_count": len(not_one),
            "not_routed_once": not_routed[:20],
            "wrong_file_name": wrong_name[:20],
            "failed_legs": failed[:20],
        }

    def _tracking(self, accepted: dict[str, Accepted]) -> dict[str, Any]:
        tracker = self.world.tracker
        assert tracker is not None
        ids = [a.event_id for a in accepted.values()]
        # What the receiver must get: each leg of each accepted upload, as the log has it.
        expected = {transfer_state_id(r[1], r[3], r[5]) for r in self._push_rows(ids)
                    if r[3] in ("RECEIVED", "SENT", "ROUTED")}  # fmt: skip
        with_deadline = True
        try:
            wait_until(lambda: expected <= set(tracker.unique_states()), self.deadline(),
                       "every leg at the tracking receiver", interval=0.5)  # fmt: skip
        except WaitTimeout:
            with_deadline = False
        states = tracker.states()
        unique = tracker.unique_states()
        seqs: dict[str, set[int]] = {}
        for record in states:
            seqs.setdefault(record["id"], set()).add(record["seq"])
        two_seqs = sorted(i for i, s in seqs.items() if len(s) > 1)
        out_of_order = [
            {"cycle": cycle, "seqs": [r["seq"] for r in records]}
            for cycle, records in tracker.by_cycle().items()
            if [r["seq"] for r in records] != sorted(r["seq"] for r in records)
        ]
        missing = sorted(expected - set(unique))
        return {
            "ok": with_deadline and not missing and not two_seqs and not out_of_order,
            "expected_legs": len(expected),
            "records": len(states),
            "repeats_dropped": len(states) - len(unique),
            "missing": missing[:20],
            "missing_count": len(missing),
            "ids_with_two_seqs": two_seqs[:20],
            "out_of_order_cycles": out_of_order[:20],
        }


def plan(options: Options, rng: random.Random) -> list[str]:
    """The faults, in turn: each once (short); `rounds` rounds, each shuffled (long)."""
    if not options.long:
        return list(FAULTS) * max(1, options.rounds)
    order: list[str] = []
    for _ in range(options.rounds or 3):
        round_ = list(FAULTS)
        rng.shuffle(round_)
        order += round_
    return order


def run(options: Options, report_path: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the whole suite; write and return the report (its "ok" says if all held)."""
    seed = options.seed or random.randrange(1, 2**31)
    rng = random.Random(seed)
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="ferrylink-chaos-"))
    began = time.monotonic()
    report: dict[str, Any] = {
        "mode": options.mode, "long": options.long, "seed": seed, "workdir": str(workdir),
        "bounds": vars(options.bounds), "faults": [], "ok": False,
    }  # fmt: skip
    world = World(workdir, options.mode)
    load: UploadLoad | None = None
    observer: Observer | None = None
    try:
        log(f"chaos: starting brokers, database and a {options.mode} cluster in {workdir}")
        world.start()
        report["setup"] = {k: round(v, 2) for k, v in world.timings.items()}
        assert world.cluster is not None
        observer = Observer(world.cluster, SERVERS).start()
        load = UploadLoad(world.cluster, workdir / "payloads", options.upload_interval).start()
        chaos = Chaos(world, load, observer, options, rng)
        baseline = chaos.check()
        report["baseline"] = baseline
        log(f"chaos: baseline {_verdict(baseline)}")
        for number, name in enumerate(plan(options, rng), 1):
            started = time.monotonic()
            entry: dict[str, Any] = {"n": number, "fault": name,
                                     "at_s": round(started - began, 2)}  # fmt: skip
            attempts_before = load.count()
            try:
                entry.update(getattr(chaos, name)())
                entry["fault_ok"] = True
            except Exception as exc:
                entry["fault_ok"] = False
                entry["fault_error"] = f"{type(exc).__name__}: {exc}"
                entry["traceback"] = traceback.format_exc(limit=5)
            entry["fault_s"] = round(time.monotonic() - started, 2)
            entry["invariants"] = chaos.check()
            entry["total_s"] = round(time.monotonic() - started, 2)
            after = load.count()
            entry["uploads"] = {"attempted": after[0] - attempts_before[0],
                                "accepted": after[1] - attempts_before[1],
                                "refused": after[2] - attempts_before[2]}  # fmt: skip
            report["faults"].append(entry)
            log(f"chaos: {number} {name} {entry.get('target', '')}: "
                f"{'done' if entry['fault_ok'] else entry['fault_error']} in "
                f"{entry['fault_s']} s; {_verdict(entry['invariants'])}")  # fmt: skip
        load.stop()
        report["final"] = chaos.check()
        log(f"chaos: final {_verdict(report['final'])}")
        attempts, accepted, refused = load.count()
        report["uploads"] = {"attempted": attempts, "accepted": accepted, "refused": refused,
                             "refusals": load.refused[:30]}  # fmt: skip
        report["observer"] = {"polls": observer.polls,
                              "activations": len(observer.activations),
                              "epochs": sorted(observer.epoch_primaries)}  # fmt: skip
        report["ok"] = all(f["fault_ok"] and _all_ok(f["invariants"]) for f in report["faults"]) \
            and _all_ok(report["final"]) and _all_ok(baseline)  # fmt: skip
    except Exception as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
        report["traceback"] = traceback.format_exc()
        log(f"chaos: aborted: {report['error']}")
    finally:
        if load is not None:
            load.stop()
        if observer is not None:
            observer.stop()
        world.close()
        report["duration_s"] = round(time.monotonic() - began, 2)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        log(f"chaos: {'PASSED' if report['ok'] else 'FAILED'} in {report['duration_s']} s; "
            f"report {report_path}")  # fmt: skip
        if not options.keep and report["ok"]:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    return report


def _all_ok(results: dict[str, dict[str, Any]]) -> bool:
    return all(r.get("ok") for r in results.values())


def _verdict(results: dict[str, dict[str, Any]]) -> str:
    broken = [name for name, r in results.items() if not r.get("ok")]
    return "all invariants hold" if not broken else f"BROKEN: {', '.join(broken)}"


__all__ = ["Bounds", "Options", "run"]
