"""Running an arrived file through its route, once, even when its event comes again.

The caller (handlers.py) holds the event's claim, so no other copy of the event acts at the
same time. Every step that changes the world follows plan -> act -> done: its target (the
new path, the remote name and size) is committed as "planned" before the side effect, and
"done" is committed with the next plan or with the event's completion. A redelivered event
skips done steps and recognises a planned one that had acted before a crash:
- move/rename: the source gone and the planned target present (or both one inode);
- copy: the temporary copy linked to the target, or the target equal to the source;
- push: a remote file of the planned name and size (pushes land under their final name
  only once complete);
- delete: the file gone.
So a crash between any two instructions neither loses nor repeats a step, and is never
mistaken for a missing file. Files are placed with link() (never replacing a file) unless
the route says `if_exists: overwrite`; a taken name fails the transfer or gets a version, as
the route says, and the transfer log shows which.

Batches: events that waited together run together (`process_batch`), each through the same
code as an event alone. An event's route runs as a generator that stops where it needs the
database: a commit (a step's plan before it acts, the event's completion) or a `{counter}`.
The batch serves all events stopped there at once: one transaction commits every waiting
event's staged rows (their claims renewed, or dropped with the completion, by one statement
that says which are still ours), one more draws the counters. What a batch reads (completed
events, step runs, legs, accounts and routes) is one query each, and its writes are Core
executemany statements. A commit that fails for a reason of one event's own is retried event
by event, so the others go on; an event that fails leaves the batch with its staged rows
dropped, exactly as when it runs alone. The transfer states go into the outbox with their
legs (one more statement per commit), are sent as each commit lands, and their confirms are
awaited once for the whole batch, before it is acked.
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from collections.abc import Generator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC
from functools import cached_property
from pathlib import Path
from typing import Any, TypeVar, assert_never

from opentelemetry import context as otel_context
from pydantic import ValidationError
from sqlalchemy import Table, bindparam, insert, select, update
from sqlalchemy.engine import Connection, Engine
from sqlmodel import Session, col
from sqlmodel import select as sqlmodel_select

from ferrylink.clock import as_utc, utcnow
from ferrylink.contracts import (
    FINAL_TRANSFER_STATUSES,
    FileArrived,
    RejectMessage,
    RetryLater,
    StepRunStatus,
)
from ferrylink.db import one_of, writing
from ferrylink.errors import INFRASTRUCTURE_ERRORS
from ferrylink.faults import fault_point
from ferrylink.metrics import PUSH_SECONDS, STEP_SECONDS, TRANSFER_FAILURES
from ferrylink.paths import PathError, confined, relative_to
from ferrylink.tables.accounts import Account, Partner
from ferrylink.tables.events import ProcessedEvent
from ferrylink.tables.transfers import Route, StepRun, Transfer
from ferrylink.telemetry import attached, mark_error, tracer
from services.transaction_manager import claims
from services.transaction_manager.steps import (
    STEPS,
    ChecksumStep,
    CopyStep,
    DeleteStep,
    MoveStep,
    PushStep,
    RenameStep,
    RetryPolicy,
    Step,
    render,
    versioned,
)
from services.transaction_manager.transfer_log import (
    FAILED,
    RECEIVED,
    ROUTED,
    SENDING,
    SENT,
    TransferLog,
    next_revision,
    settle,
)

log = logging.getLogger(__name__)
# Versioned names tried before a step gives up ("report_1.csv" .. "report_999.csv").
MAX_VERSIONS = 999
# Seconds to wait for the broker's confirms of a batch's transfer states.
CONFIRM_SECONDS = 30.0

T = TypeVar("T")


def _table(model: Any) -> Table:
    table: Table = model.__table__
    return table


ACCOUNTS, ROUTES = _table(Account), _table(Route)
PROCESSED, STEP_RUNS, LEGS = _table(ProcessedEvent), _table(StepRun), _table(Transfer)
LEG_COLUMNS = [c.name for c in LEGS.columns if c.name != "id"]
LEG_DEFAULTS: dict[str, Any] = {
    "bytes": 0, "partner": None, "detail": "", "finished_at": None, "duration_ms": None,
}  # fmt: skip


class StepFailed(Exception):
    """A step that cannot succeed (bad checksum, unknown partner, a taken name, out of
    retries): the transfer is marked FAILED and the route stops; the event itself is
    complete."""


# -- configuration --------------------------------------------------------------------------


@dataclass
class RouteConfig:
    id: int
    pattern: str
    steps_json: str

    @cached_property
    def steps(self) -> list[Step]:
        return list(STEPS.validate_json(self.steps_json))

    @property
    def pushes(self) -> bool:
        """Whether a step talks to a partner (long, external: run alone, not batched);
        a route whose steps do not parse counts too (it fails alone, with its reason)."""
        try:
            return any(isinstance(step, PushStep) for step in self.steps)
        except ValidationError:
            return True


@dataclass
class Config:
    """The accounts' homes and enabled routes, read once per batch: configuration, so a
    change applies from the next batch on."""

    homes: dict[str, str]
    routes: dict[str, list[RouteConfig]]  # by account, in the order they are tried

    @classmethod
    def read(cls, connection: Connection) -> Config:
        homes = {row.name: row.home for row in connection.execute(
            select(ACCOUNTS.c.name, ACCOUNTS.c.home))}  # fmt: skip
        routes: dict[str, list[RouteConfig]] = {}
        rows = connection.execute(
            select(ROUTES.c.id, ROUTES.c.account, ROUTES.c.pattern, ROUTES.c.steps_json)
            .where(ROUTES.c.enabled.is_(True))
            .order_by(ROUTES.c.position, ROUTES.c.id)
        )
        for row in rows:
            routes.setdefault(row.account, []).append(
                RouteConfig(row.id, row.pattern, row.steps_json)
            )
        connection.commit()
        return cls(homes, routes)

    def route_for(self, account: str, file_name: str) -> RouteConfig | None:
        return next((r for r in self.routes.get(account, ())
                     if fnmatch.fnmatchcase(file_name, r.pattern)), None)  # fmt: skip

    def batched(self, event: FileArrived) -> bool:
        """Whether the event may run in a batch: its route (if any) has local steps only."""
        route = self.route_for(event.account, Path(event.path).name)
        return route is None or not route.pushes


# -- one event's handling, and what a batch shares ------------------------------------------


@dataclass(frozen=True)
class _Commit:
    """The event stopped where its staged rows must be committed: renewing its claim, or
    dropping it with the completion (`final`)."""

    final: bool = False


@dataclass(frozen=True)
class _Counter:
    """The event needs the route's next `{counter}` value (sent back into it)."""

    route_id: int


_Request = _Commit | _Counter
# What a stopped event is resumed with: the value it asked for, or the exception it gets.
_Resume = tuple[Any, Exception | None]
# An event's route (or a part of it): stops at each request, returns a T.
_Steps = Generator[_Request, Any, T]


@dataclass
class _Work:
    """One event's handling in a batch: what it staged since its last commit, and notes for
    the transfer log."""

    event: FileArrived
    # The trace context to work on this event in (its consumer span, then its step span).
    trace: otel_context.Context
    route: RouteConfig | None = None
    common: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    runs: dict[int, tuple[str, str]] = field(default_factory=dict)  # step index: status, plan
    legs: dict[str, dict[str, Any]] = field(default_factory=dict)  # leg key: the whole row
    completed: bool = False  # its processed_event row is staged
    failed_step: str = ""

    def discard(self) -> None:
        self.runs.clear()
        self.legs.clear()
        self.completed = False


class _Unit:
    """The database side of a batch: what it read, and its commits."""

    def __init__(self, runner: RouteRunner, owner: str, size: int = 1) -> None:
        self.size = size  # events in the batch (its fault points say so)
        self.engine = runner.engine
        self.node_id = runner.node_id
        self.claim_seconds = runner.claim_seconds
        self.log = runner.log
        self.owner = owner
        self.processed: set[str] = set()
        self.runs: dict[tuple[str, int], tuple[str, str]] = {}  # committed step runs
        self._started: set[str] = set()
        self.legs: dict[str, dict[str, Any] | None] = {}  # committed legs (None: none yet)
        self.folders: dict[str, Path] = {}  # homes and step folders, confined
        self.created: set[str] = set()  # step folders made sure of
        self._connection: Connection | None = None
        # The states of the rows being committed (with their outbox messages), sent once
        # committed; the broker's answers to what was sent.
        self.announced: tuple[list[dict[str, Any]], list[Any]] = ([], [])
        self.futures: list[Future[Any]] = []

    def connection(self) -> Connection:
        if self._connection is None:
            self._connection = self.engine.connect()
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                connection.close()  # rolls back whatever is uncommitted
            except Exception as exc:  # a lost connection: the pool discards it
                log.debug("closing a batch's connection: %s", exc)

    def load(self, event_ids: Sequence[str]) -> None:
        """What the batch's events did before: completed, step runs, receive and route legs
        (a push leg is read when first staged: pushes run alone)."""
        connection = self.connection()
        dialect = connection.dialect.name
        self.processed = set(connection.execute(
            select(PROCESSED.c.event_id).where(one_of(PROCESSED.c.event_id, event_ids, dialect))
        ).scalars())  # fmt: skip
        rows = connection.execute(
            select(STEP_RUNS.c.event_id, STEP_RUNS.c.step_index, STEP_RUNS.c.status,
                   STEP_RUNS.c.result).where(one_of(STEP_RUNS.c.event_id, event_ids, dialect))
        )  # fmt: skip
        for row in rows:
            self.runs[(row.event_id, row.step_index)] = (row.status, row.result)
        self._started = {event_id for event_id, _index in self.runs}
        keys = [f"{event_id}:{leg}" for event_id in event_ids for leg in ("receive", "route")]
        self.legs.update(dict.fromkeys(keys))
        legs = select(LEGS).where(one_of(LEGS.c.leg_key, keys, dialect))
        for leg in connection.execute(legs).mappings():
            self.legs[leg["leg_key"]] = dict(leg)
        connection.commit()

    def started(self, event_id: str) -> bool:
        """Whether a step of the event was planned before this batch."""
        return event_id in self._started

    def step_run(self, work: _Work, index: int) -> tuple[str, str] | None:
        return work.runs.get(index) or self.runs.get((work.event.id, index))

    def save_run(self, work: _Work, index: int, plan: dict[str, Any], done: bool = False
                 ) -> None:  # fmt: skip
        """Stage a step's plan or result (committed with the event's next commit)."""
        status = StepRunStatus.DONE if done else StepRunStatus.PLANNED
        work.runs[index] = (status.value, json.dumps(plan))

    def stage_leg(self, work: _Work, leg_key: str, status: str, **fields: Any) -> None:
        """Create or update a leg with the event's next commit (and publish it then);
        nothing when the leg is in that state already (a redelivered event)."""
        current = work.legs.get(leg_key) or self._leg(leg_key)
        now = utcnow()
        if current is None:
            row = {**LEG_DEFAULTS, "started_at": now, **fields}
        elif current["status"] == status:
            return
        else:
            row = {**current, **fields}
        revision = next_revision(None if current is None else current["revision"])
        row.update(leg_key=leg_key, status=str(status), node_id=self.node_id, revision=revision)
        if status in FINAL_TRANSFER_STATUSES:
            row["finished_at"] = now
            row["duration_ms"] = int((now - as_utc(row["started_at"])).total_seconds() * 1000)
        work.legs[leg_key] = row

    def _leg(self, leg_key: str) -> dict[str, Any] | None:
        if leg_key not in self.legs:
            leg = self.connection().execute(
                select(LEGS).where(LEGS.c.leg_key == leg_key)
            ).mappings().first()  # fmt: skip
            self.connection().commit()
            self.legs[leg_key] = dict(leg) if leg is not None else None
        return self.legs[leg_key]

    # -- the batch's round trips --------------------------------------------------------------

    def draw_counters(self, requests: dict[str, _Counter]) -> dict[str, _Resume]:
        """The next `{counter}` value for each waiting event: one statement per route, in a
        transaction of their own (committed before any plan uses them)."""
        by_route: dict[int, list[str]] = {}
        for event_id, request in requests.items():
            by_route.setdefault(request.route_id, []).append(event_id)
        values: dict[str, _Resume] = {}
        try:
            connection = self.connection()
            with writing(self.engine):
                for route_id, event_ids in by_route.items():
                    last = claims.next_counters(connection, route_id, len(event_ids))
                    first = last - len(event_ids) + 1
                    values.update({e: (first + i, None) for i, e in enumerate(event_ids)})
                connection.commit()
        except Exception as exc:
            self.close()
            return {event_id: (None, exc) for event_id in requests}
        return values

    def commit(self, waiting: dict[str, tuple[_Work, _Commit]]) -> dict[str, Exception | None]:
        """Commit what the waiting events staged, in one transaction; what to resume each
        with (None, or the exception its commit failed with)."""
        results: dict[str, Exception | None] = dict.fromkeys(waiting)
        pending = dict(waiting)
        while pending:
            try:
                lost = self._write(pending)
            except Exception as exc:
                self.close()
                if len(pending) == 1 or isinstance(exc, INFRASTRUCTURE_ERRORS):
                    results.update(dict.fromkeys(pending, exc))
                else:  # one event's rows: find it, commit the others
                    for event_id, item in pending.items():
                        results.update(self.commit({event_id: item}))
                return results
            if not lost:
                for work, _request in pending.values():
                    self._committed(work)
                self._send_announced()
                return results
            for event_id in lost:  # the others go on without them
                results[event_id] = claims.ClaimLost(
                    f"the claim of event {event_id} passed to another owner"
                )
                del pending[event_id]
        return results

    def _write(self, pending: dict[str, tuple[_Work, _Commit]]) -> set[str]:
        """Renew or drop the claims, write every staged row, commit; or, if some claims
        are no longer ours, roll back and return those events. The rows are made before the
        first write: the database's write lock is held for the statements alone."""
        connection = self.connection()
        renewing = [e for e, (_w, request) in pending.items() if not request.final]
        finishing = [e for e, (_w, request) in pending.items() if request.final]
        now = utcnow()
        new_runs: list[dict[str, Any]] = []
        old_runs: list[dict[str, Any]] = []
        new_legs: list[dict[str, Any]] = []
        old_legs: list[dict[str, Any]] = []
        completed: list[dict[str, Any]] = []
        states: list[dict[str, Any]] = []  # the legs' new states, for the outbox
        traces: list[otel_context.Context] = []
        for event_id, (work, _request) in pending.items():
            for index, (status, result) in work.runs.items():
                if (event_id, index) in self.runs:
                    old_runs.append({"k_event": event_id, "k_index": index, "status": status,
                                     "result": result})  # fmt: skip
                else:
                    new_runs.append({"event_id": event_id, "step_index": index,
                                     "status": status, "result": result,
                                     "finished_at": now})  # fmt: skip
            for leg_key, row in work.legs.items():
                values = {name: row.get(name) for name in LEG_COLUMNS}
                if self.legs.get(leg_key) is None:
                    new_legs.append(values)
                else:
                    del values["leg_key"]
                    old_legs.append({**values, "k_leg": leg_key})
                states.append(row)
                traces.append(work.trace)
            if work.completed:
                completed.append({"event_id": event_id, "kind": work.event.kind,
                                  "node_id": self.node_id,
                                  "processed_at": time.time()})  # fmt: skip
        # The states' messages: in the outbox, committed with their legs, few for the commit.
        prepared = self.log.prepare_rows(states, traces)
        with writing(self.engine):
            announced = (states, self.log.announce_prepared(connection, prepared))
            ours: set[str] = set()
            if renewing:
                ours |= claims.renew_many(connection, renewing, self.owner, self.claim_seconds)
            if finishing:
                ours |= claims.finish_many(connection, finishing, self.owner)
            lost = set(pending) - ours
            if lost:
                connection.rollback()
                return lost
            self._write_rows(connection, new_runs, old_runs, new_legs, old_legs, completed)
            connection.commit()
        self.announced = announced
        return set()

    @staticmethod
    def _write_rows(
        connection: Connection,
        new_runs: list[dict[str, Any]],
        old_runs: list[dict[str, Any]],
        new_legs: list[dict[str, Any]],
        old_legs: list[dict[str, Any]],
        completed: list[dict[str, Any]],
    ) -> None:
        if new_runs:
            connection.execute(insert(STEP_RUNS), new_runs)
        if old_runs:
            connection.execute(
                update(STEP_RUNS).where(STEP_RUNS.c.event_id == bindparam("k_event"),
                                        STEP_RUNS.c.step_index == bindparam("k_index")),
                old_runs,
            )  # fmt: skip
        if new_legs:
            connection.execute(insert(LEGS), new_legs)
        if old_legs:
            connection.execute(update(LEGS).where(LEGS.c.leg_key == bindparam("k_leg")), old_legs)
        if completed:
            connection.execute(insert(PROCESSED), completed)

    def _send_announced(self) -> None:
        """Publish the states the last commit put in the outbox."""
        rows, staged = self.announced
        self.announced = ([], [])
        try:
            self.futures += self.log.send(rows, staged)
        except Exception as exc:  # committed in the outbox: the relay sends them
            log.warning("%d transfer states not sent (%s); the outbox keeps them",
                        len(rows), exc)  # fmt: skip

    def _committed(self, work: _Work) -> None:
        """The event's rows are committed: remember them."""
        event_id = work.event.id
        for index, run in work.runs.items():
            self.runs[(event_id, index)] = run
        for leg_key, row in work.legs.items():
            self.legs[leg_key] = row
        if work.completed:
            self.processed.add(event_id)
        work.runs.clear()
        work.legs.clear()
        work.completed = False


class RouteRunner:
    def __init__(self, engine: Engine, data_dir: Path, transfer_log: TransferLog,
                 node_id: str, claim_seconds: float = 60.0) -> None:  # fmt: skip
        self.engine = engine
        self.data_dir = data_dir.resolve()
        self._data_prefix = str(self.data_dir) + "/"
        self.log = transfer_log
        self.node_id = node_id
        self.claim_seconds = claim_seconds

    def config(self) -> Config:
        with self.engine.connect() as connection:
            return Config.read(connection)

    # -- events ----------------------------------------------------------------------------------

    def process(self, event: FileArrived, owner: str) -> bool:
        """Route the file of a `file.arrived` event; False if it had been done before.

        The caller holds the event's claim as `owner`; every commit here renews it (and
        fails if it was lost). State changes are published once committed, and confirmed
        before this returns (and the event is acked).
        """
        outcome = self.process_batch([event], owner)[event.id]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def process_batch(
        self,
        events: Sequence[FileArrived],
        owner: str,
        traces: Sequence[otel_context.Context] | None = None,
        config: Config | None = None,
    ) -> dict[str, bool | Exception]:
        """Route the files of claimed events (distinct ids, all claimed by `owner`) together;
        per event: True (done now), False (done before) or the exception it failed with
        (its own: the others go on). State changes are in the outbox and sent, and their
        confirms awaited (a while) before this returns. `traces`: the context to work on each
        event in (default: the current one)."""
        unit = _Unit(self, owner, len(events))
        current = otel_context.get_current()
        works = {e.id: _Work(e, traces[i] if traces else current) for i, e in enumerate(events)}
        outcomes: dict[str, bool | Exception] = {}
        try:
            if config is None:
                config = Config.read(unit.connection())
            unit.load(list(works))
        except Exception as exc:
            unit.close()
            return dict.fromkeys(works, exc)
        routes = {event_id: self._route(unit, config, work) for event_id, work in works.items()}
        # Where each event goes on from: the value or the exception to resume it with.
        resume: dict[str, _Resume] = dict.fromkeys(works, (None, None))
        waiting: dict[str, tuple[_Work, _Commit]] = {}
        try:
            while resume:
                counters: dict[str, _Counter] = {}
                for event_id, (value, error) in resume.items():
                    work = works[event_id]
                    try:
                        request = _advance(routes[event_id], work, value, error)
                    except StopIteration as stop:
                        outcomes[event_id] = bool(stop.value)
                        continue
                    except Exception as exc:
                        outcomes[event_id] = exc
                        work.discard()
                        continue
                    if isinstance(request, _Counter):
                        counters[event_id] = request
                    else:
                        waiting[event_id] = (work, request)
                if counters:
                    resume = unit.draw_counters(counters)
                elif waiting:
                    committed = unit.commit(waiting)
                    resume = {event_id: (None, error) for event_id, error in committed.items()}
                    waiting = {}
                else:
                    resume = {}
        finally:
            unit.close()
            for event_id, route in routes.items():
                if event_id not in outcomes:  # only when this loop failed (a bug)
                    with attached(works[event_id].trace):
                        route.close()
        # The broker's answers to every state of the batch (not answered in time: the
        # states are in the outbox, the relay sends them; nothing fails for it).
        settle(unit.futures, CONFIRM_SECONDS)
        for event_id, work in works.items():
            if outcomes.get(event_id) is True and work.failed_step:
                TRANSFER_FAILURES.labels(reason=work.failed_step).inc()
        for event_id in works:
            outcomes.setdefault(event_id, RuntimeError("the batch stopped before this event"))
        return outcomes

    def _route(self, unit: _Unit, config: Config, work: _Work) -> _Steps[bool]:
        """One event's route; stops at each commit and counter it needs."""
        event = work.event
        if event.id in unit.processed:
            return False
        home = config.homes.get(event.account)
        if home is None:
            raise RejectMessage(f"unknown account {event.account!r}")
        try:
            source = confined(self._confined(unit, home), event.path, resolved=True)
        except PathError as exc:
            raise RejectMessage(f"bad path in event: {exc}") from exc
        try:
            found = source.stat()
            there, size = stat.S_ISREG(found.st_mode), found.st_size
        except OSError:
            there, size = False, event.size or 0
        if not there and not unit.started(event.id):
            raise RejectMessage(f"missing file {event.path!r} in {event.account}'s home")
        common = work.common = dict(
            cycle_id=event.cycle_id, event_id=event.id, account=event.account,
            file_name=event.path, bytes=size,
        )  # fmt: skip
        unit.stage_leg(work, f"{event.id}:receive", RECEIVED, leg="receive",
                       direction="inbound", protocol=event.protocol, **common)  # fmt: skip
        route = work.route = config.route_for(event.account, Path(event.path).name)
        if route is None:
            log.info("no route for %s/%s: it stays in the home", event.account, event.path)
        else:
            status, detail = ROUTED, ""
            try:
                current = source
                for index, step in enumerate(route.steps):
                    current = yield from self._run_step(unit, work, index, step, current)
            except StepFailed as exc:
                log.warning("transfer of %s failed: %s", event.path, exc)
                status, detail, work.failed_step = FAILED, str(exc), step.kind
            detail = "; ".join([*work.notes, detail] if detail else work.notes)
            unit.stage_leg(work, f"{event.id}:route", status, leg="route", direction="internal",
                           protocol="file", detail=detail[:2000], **common)  # fmt: skip
        work.completed = True
        yield _Commit(final=True)
        return True

    @staticmethod
    def _route_for(session: Session, account: str, file_name: str) -> Route | None:
        routes = session.exec(
            sqlmodel_select(Route)
            .where(Route.account == account, col(Route.enabled).is_(True))
            .order_by(col(Route.position), col(Route.id))
        ).all()
        return next((r for r in routes if fnmatch.fnmatchcase(file_name, r.pattern)), None)

    # -- steps ---------------------------------------------------------------------------------

    def _run_step(self, unit: _Unit, work: _Work, index: int, step: Step, current: Path
                  ) -> _Steps[Path]:  # fmt: skip
        started = time.perf_counter()
        outcome = "failed"
        with tracer().start_as_current_span(
            f"step {step.kind}",
            attributes={"ferrylink.step.kind": step.kind, "ferrylink.step.index": index,
                        "ferrylink.event_id": work.event.id},
            record_exception=False, set_status_on_exception=False,
        ) as span:  # fmt: skip
            try:
                result = yield from self._run_step_once(unit, work, index, step, current)
                outcome = "done"
                return result
            except RetryLater as exc:
                outcome = "retry"
                span.add_event("retry later", {"reason": str(exc)})
                raise
            except Exception as exc:
                mark_error(span, exc)  # the failed step shows as an error in the trace
                raise
            finally:
                STEP_SECONDS.labels(step=step.kind, outcome=outcome).observe(
                    time.perf_counter() - started
                )

    def _run_step_once(self, unit: _Unit, work: _Work, index: int, step: Step, current: Path
                       ) -> _Steps[Path]:  # fmt: skip
        event = work.event
        run = unit.step_run(work, index)
        if run is not None and run[0] == StepRunStatus.DONE:
            return self.data_dir / json.loads(run[1])["path"]
        plan: dict[str, Any] = json.loads(run[1]) if run is not None else {}
        result = current
        try:
            if isinstance(step, CopyStep | MoveStep | RenameStep):
                result = yield from self._place_step(unit, work, index, step, current, plan)
            elif isinstance(step, ChecksumStep):
                digest = _digest(current, step.algorithm)
                expected = event.checksum if step.expected == "event" else step.expected
                if expected and expected.lower() != digest:
                    raise StepFailed(
                        f"{step.algorithm} mismatch: expected {expected}, got {digest}"
                    )
                plan["digest"] = digest
            elif isinstance(step, PushStep):
                yield from self._push(unit, work, index, step, current, plan)
            elif isinstance(step, DeleteStep):
                if not plan:
                    plan["deleted"] = self._relative(current)
                    yield from self._plan(unit, work, index, plan)
                    fault_point("after-plan", unit.size)
                current.unlink(missing_ok=True)
                fault_point("after-move-before-commit", unit.size)
            else:
                assert_never(step)
        except OSError as exc:  # the local file system: may pass (a full disk, a lost mount)
            yield from self._retry_or_fail(unit, work, index, step.retry, plan,
                                           f"{step.kind}: {exc}")  # fmt: skip
            raise StepFailed(f"{step.kind} failed: {exc}") from exc
        plan["path"] = self._relative(result)
        # Committed with the next step's plan, or with the event.
        unit.save_run(work, index, plan, done=True)
        return result

    @staticmethod
    def _plan(unit: _Unit, work: _Work, index: int, plan: dict[str, Any]) -> _Steps[None]:
        """Commit the step's plan (and the done marks staged before it) before it acts."""
        unit.save_run(work, index, plan)
        yield _Commit()

    def _retry_or_fail(self, unit: _Unit, work: _Work, index: int, policy: RetryPolicy,
                       plan: dict[str, Any], reason: str) -> _Steps[None]:  # fmt: skip
        """Within the step's attempts: record the try and reschedule the event (RetryLater,
        nothing sleeps here). Out of attempts: return, the caller fails the step."""
        tries = int(plan.get("tries", 0)) + 1
        if tries >= policy.attempts:
            return
        plan["tries"] = tries
        yield from self._plan(unit, work, index, plan)
        delay = policy.backoff_seconds * 2 ** (tries - 1)
        raise RetryLater(f"step {index} ({reason}); try {tries + 1} in {delay:g} s", delay)

    def _place_step(self, unit: _Unit, work: _Work, index: int,
                    step: CopyStep | MoveStep | RenameStep, current: Path,
                    plan: dict[str, Any]) -> _Steps[Path]:  # fmt: skip
        keep = isinstance(step, CopyStep)
        overwrite = step.if_exists == "overwrite"
        target: Path | None = None
        if "target" in plan:  # planned before: did it act before a crash?
            target = self.data_dir / plan["target"]
            found = _placed(current, target, keep, _temporary(target, work.event.id))
            if found == "done":
                return current if keep else target
            if found == "missing":
                raise StepFailed(f"{step.kind}: {self._relative(current)} is gone "
                                 f"and {plan['target']} does not hold it")  # fmt: skip
            if found == "taken" and not overwrite:
                target = yield from self._next_name(unit, work, index, step, plan)
        if target is None:
            target = yield from self._first_name(unit, work, index, step, current, plan)
        fault_point("after-plan", unit.size)
        while True:
            try:
                _place(current, target, keep, overwrite, _temporary(target, work.event.id))
                break
            except FileExistsError:  # taken between our look and our link
                target = yield from self._next_name(unit, work, index, step, plan)
        fault_point("after-move-before-commit", unit.size)
        if target.name != Path(plan["desired"]).name:
            work.notes.append(f"{step.kind}: {plan['desired']} existed; "
                              f"placed as {plan['target']}")  # fmt: skip
        elif overwrite and plan.get("replaced"):
            work.notes.append(f"{step.kind}: replaced {plan['target']}")
        return current if keep else target

    def _first_name(self, unit: _Unit, work: _Work, index: int,
                    step: CopyStep | MoveStep | RenameStep, current: Path,
                    plan: dict[str, Any]) -> _Steps[Path]:  # fmt: skip
        if isinstance(step, RenameStep):
            event = work.event
            assert work.route is not None
            counter = yield _Counter(work.route.id)
            name = render(step.template, current.name, event.created_at.astimezone(UTC),
                          counter, event.id, event.cycle_id)  # fmt: skip
            desired = current.parent / name
        else:
            desired = self._confined(unit, step.folder, create=True) / current.name
        plan["desired"] = self._relative(desired)
        if desired == current or not _taken(desired):
            plan["target"] = plan["desired"]
            yield from self._plan(unit, work, index, plan)
            return desired
        if step.if_exists == "overwrite":
            plan["target"], plan["replaced"] = plan["desired"], True
            yield from self._plan(unit, work, index, plan)
            return desired
        return (yield from self._next_name(unit, work, index, step, plan))

    def _next_name(self, unit: _Unit, work: _Work, index: int,
                   step: CopyStep | MoveStep | RenameStep,
                   plan: dict[str, Any]) -> _Steps[Path]:  # fmt: skip
        """The desired name is taken: fail, or plan the next free versioned name."""
        desired = self.data_dir / plan["desired"]
        if step.if_exists != "version":
            raise StepFailed(f"{step.kind}: {plan['desired']} exists (if_exists: "
                             f"{step.if_exists}); the file stays where it was")  # fmt: skip
        for version in range(1, MAX_VERSIONS + 1):
            candidate = desired.with_name(versioned(desired.name, version))
            if not _taken(candidate):
                plan["target"] = self._relative(candidate)
                yield from self._plan(unit, work, index, plan)
                return candidate
        raise StepFailed(f"{step.kind}: {plan['desired']} and {MAX_VERSIONS} versions exist")

    def _push(self, unit: _Unit, work: _Work, index: int, step: PushStep, current: Path,
              plan: dict[str, Any]) -> _Steps[None]:  # fmt: skip
        # Imported here: asyncssh costs ~15 MB, and only servers that push need it.
        from services.transaction_manager import partners

        event = work.event
        with Session(self.engine) as session:
            partner = session.get(Partner, step.partner)
        leg_key = f"{event.id}:push:{index}"
        leg = dict(work.common, leg=f"push:{index}", direction="outbound",
                   partner=step.partner,
                   protocol=partner.protocol if partner else "unknown")  # fmt: skip
        if partner is None:
            unit.stage_leg(work, leg_key, FAILED, detail="unknown partner", **leg)
            raise StepFailed(f"unknown partner {step.partner!r}")
        try:
            if "remote_name" not in plan:
                plan["remote_name"] = render(step.remote_name, current.name,
                                             event.created_at.astimezone(UTC), 0, event.id,
                                             event.cycle_id)  # fmt: skip
                plan["size"] = current.stat().st_size
                unit.stage_leg(work, leg_key, SENDING, **leg)
                yield from self._plan(unit, work, index, plan)  # SENDING announced before
                fault_point("after-plan", unit.size)
            elif partners.remote_size(partner, plan["remote_name"]) == plan["size"]:
                # Pushed before a crash (or a lost confirm): recognised, not sent again.
                unit.stage_leg(work, leg_key, SENT, **{**leg, "bytes": plan["size"], "detail": ""})
                return
            pushing, outcome = time.perf_counter(), "failed"
            try:
                sent = partners.push_file(partner, current, plan["remote_name"])
                outcome = "sent"
            finally:
                PUSH_SECONDS.labels(protocol=partner.protocol, outcome=outcome).observe(
                    time.perf_counter() - pushing
                )
        except partners.PartnerError as exc:
            if exc.retryable:
                yield from self._retry_or_fail(unit, work, index, step.retry, plan, str(exc))
            unit.stage_leg(work, leg_key, FAILED, detail=str(exc)[:2000], **leg)
            raise StepFailed(f"push to {step.partner} failed: {exc}") from exc
        fault_point("after-push-before-record")
        fault_point(f"after-push-before-record:{partner.protocol}")
        unit.stage_leg(work, leg_key, SENT, **{**leg, "bytes": sent, "detail": ""})

    def _confined(self, unit: _Unit, folder: str, create: bool = False) -> Path:
        """A home or a step's folder inside the data directory (once per batch: resolving
        it costs a system call per part); StepFailed for a step's folder outside it."""
        path = unit.folders.get(folder)
        if path is None:
            try:
                path = confined(self.data_dir, folder)
            except PathError as exc:
                if not create:
                    raise
                raise StepFailed(str(exc)) from exc
            unit.folders[folder] = path
        if create and folder not in unit.created:
            path.mkdir(parents=True, exist_ok=True)
            unit.created.add(folder)
        return path

    def _relative(self, path: Path) -> str:
        """`relative_to(data_dir, path)` for a path in a resolved folder: resolving is needed
        only when its own name is a link (string work otherwise: this runs for every step)."""
        text = str(path)
        prefix = self._data_prefix
        if text.startswith(prefix) and not os.path.islink(text):
            return text[len(prefix) :]
        return relative_to(self.data_dir, path)


def _advance(route: _Steps[bool], work: _Work, value: Any, error: Exception | None) -> _Request:
    """Run one event's route on to its next request, in the event's trace context (kept
    from where it stopped, so a step's span stays current across the stop)."""
    token = otel_context.attach(work.trace)
    try:
        request = route.throw(error) if error is not None else route.send(value)
        work.trace = otel_context.get_current()
        return request
    finally:
        otel_context.detach(token)


def _temporary(target: Path, event_id: str) -> Path:
    """Where a copy is written before it is linked under its name (one per event)."""
    return target.with_name(f".{target.name}.{event_id[:16]}.part")


def _taken(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _placed(source: Path, target: Path, keep: bool, temporary: Path) -> str:
    """What a planned copy/move finds after a crash: "done" (and tidied), "todo" (place it),
    "taken" (the target holds another file), or "missing" (neither holds the file)."""
    if source == target:
        return "done"
    source_there, target_there = source.is_file(), _taken(target)
    if temporary.exists() and target_there and os.path.samefile(temporary, target):
        if not keep:
            source.unlink(missing_ok=True)
        temporary.unlink()
        return "done"
    if not target_there:
        return "todo" if source_there else "missing"
    if not source_there:
        return "done" if not keep else "missing"
    if os.path.samefile(source, target):  # linked, the source not yet removed
        if not keep:
            source.unlink()
        return "done"
    if keep and _same_content(source, target):  # copied, the temporary already removed
        return "done"
    return "taken"


def _place(source: Path, target: Path, keep: bool, overwrite: bool, temporary: Path) -> None:
    """Copy (keep=True) or move `source` to `target`. Never replaces an existing target
    (FileExistsError) unless `overwrite`: link() is atomic and fails on a taken name."""
    try:
        _place_in(source, target, keep, overwrite, temporary)
    except FileNotFoundError:
        if target.parent.is_dir():
            raise
        # Its folder is missing (nothing was done): make it, place again.
        target.parent.mkdir(parents=True, exist_ok=True)
        _place_in(source, target, keep, overwrite, temporary)


def _place_in(source: Path, target: Path, keep: bool, overwrite: bool, temporary: Path) -> None:
    if not keep:
        try:
            if overwrite:
                os.replace(source, target)
                return
            os.link(source, target)
            source.unlink()
            return
        except OSError as exc:
            if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
                raise
        # Another file system (or no hard links): copy, then remove the source.
    shutil.copyfile(source, temporary)
    if overwrite:
        os.replace(temporary, target)
    else:
        try:
            os.link(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    if not keep:
        source.unlink()
    temporary.unlink(missing_ok=True)


def _same_content(a: Path, b: Path) -> bool:
    return a.stat().st_size == b.stat().st_size and _digest(a, "sha256") == _digest(b, "sha256")


def _digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()
