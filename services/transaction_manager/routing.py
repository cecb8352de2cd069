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
"""

from __future__ import annotations

import errno
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC
from pathlib import Path
from typing import Any, assert_never

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from ferrylink.contracts import FileArrived, RejectMessage, RetryLater, StepRunStatus
from ferrylink.faults import fault_point
from ferrylink.metrics import PUSH_SECONDS, STEP_SECONDS, TRANSFER_FAILURES
from ferrylink.models import (
    Account,
    Partner,
    ProcessedEvent,
    Route,
    StepRun,
)
from ferrylink.paths import PathError, confined, relative_to
from ferrylink.telemetry import mark_error, tracer
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
    StagedLeg,
    TransferLog,
    settle,
)

log = logging.getLogger(__name__)
# Versioned names tried before a step gives up ("report_1.csv" .. "report_999.csv").
MAX_VERSIONS = 999


class StepFailed(Exception):
    """A step that cannot succeed (bad checksum, unknown partner, a taken name, out of
    retries): the transfer is marked FAILED and the route stops; the event itself is
    complete."""


@dataclass
class _Context:
    """One handling of one event: its session and staged states, and notes for the log."""

    states: _States
    event: FileArrived
    route: Route
    common: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    @property
    def session(self) -> Session:
        return self.states.session


class RouteRunner:
    def __init__(self, engine: Engine, data_dir: Path, transfer_log: TransferLog,
                 node_id: str, claim_seconds: float = 60.0) -> None:  # fmt: skip
        self.engine = engine
        self.data_dir = data_dir
        self.log = transfer_log
        self.node_id = node_id
        self.claim_seconds = claim_seconds

    # -- the event -----------------------------------------------------------------------------

    def process(self, event: FileArrived, owner: str) -> bool:
        """Route the file of a `file.arrived` event; False if it had been done before.

        The caller holds the event's claim as `owner`; every commit here renews it (and
        fails if it was lost). State changes are published once committed, and confirmed
        before this returns (and the event is acked).
        """
        # No expiry on commit: the legs are read again to publish them.
        with Session(self.engine, expire_on_commit=False) as session:
            if session.get(ProcessedEvent, event.id) is not None:
                return False
            account = session.get(Account, event.account)
            if account is None:
                raise RejectMessage(f"unknown account {event.account!r}")
            try:
                home = confined(self.data_dir, account.home)
                source = confined(home, event.path)
            except PathError as exc:
                raise RejectMessage(f"bad path in event: {exc}") from exc
            started = session.exec(select(StepRun).where(StepRun.event_id == event.id)).first()
            if not source.is_file() and started is None:
                raise RejectMessage(f"missing file {event.path!r} in {account.name}'s home")
            common = dict(
                cycle_id=event.cycle_id, event_id=event.id, account=account.name,
                file_name=event.path, bytes=_size(source, event.size),
            )  # fmt: skip
            states = _States(self.log, session, event.id, owner, self.claim_seconds)
            failed_step = ""
            states.stage(f"{event.id}:receive", RECEIVED, leg="receive", direction="inbound",
                         protocol=event.protocol, **common)  # fmt: skip
            route = self._route_for(session, account.name, Path(event.path).name)
            if route is None:
                log.info("no route for %s/%s: it stays in the home", account.name, event.path)
            else:
                context = _Context(states, event, route, common)
                status, detail = ROUTED, ""
                try:
                    current = source
                    for index, step in enumerate(STEPS.validate_json(route.steps_json)):
                        current = self._run_step(context, index, step, current)
                except StepFailed as exc:
                    log.warning("transfer of %s failed: %s", event.path, exc)
                    status, detail, failed_step = FAILED, str(exc), step.kind
                detail = "; ".join([*context.notes, detail] if detail else context.notes)
                states.stage(f"{event.id}:route", status, leg="route", direction="internal",
                             protocol="file", detail=detail[:2000], **common)  # fmt: skip
            session.add(ProcessedEvent(event_id=event.id, kind=event.kind, node_id=self.node_id,
                                       processed_at=time.time()))  # fmt: skip
            states.commit(final=True)
        states.wait()
        if failed_step:
            TRANSFER_FAILURES.labels(reason=failed_step).inc()
        return True

    @staticmethod
    def _route_for(session: Session, account: str, file_name: str) -> Route | None:
        routes = session.exec(
            select(Route)
            .where(Route.account == account, col(Route.enabled).is_(True))
            .order_by(col(Route.position), col(Route.id))
        ).all()
        return next((r for r in routes if fnmatch.fnmatchcase(file_name, r.pattern)), None)

    # -- steps ---------------------------------------------------------------------------------

    def _run_step(self, context: _Context, index: int, step: Step, current: Path) -> Path:
        started = time.perf_counter()
        outcome = "failed"
        with tracer().start_as_current_span(
            f"step {step.kind}",
            attributes={"ferrylink.step.kind": step.kind, "ferrylink.step.index": index,
                        "ferrylink.event_id": context.event.id},
            record_exception=False, set_status_on_exception=False,
        ) as span:  # fmt: skip
            try:
                result = self._run_step_once(context, index, step, current)
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

    def _run_step_once(self, context: _Context, index: int, step: Step, current: Path) -> Path:
        event = context.event
        run = context.session.get(StepRun, (event.id, index))
        if run is not None and run.status == StepRunStatus.DONE:
            return self.data_dir / json.loads(run.result)["path"]
        plan: dict[str, Any] = json.loads(run.result) if run is not None else {}
        result = current
        try:
            if isinstance(step, CopyStep | MoveStep | RenameStep):
                result = self._place_step(context, index, step, current, plan)
            elif isinstance(step, ChecksumStep):
                digest = _digest(current, step.algorithm)
                expected = event.checksum if step.expected == "event" else step.expected
                if expected and expected.lower() != digest:
                    raise StepFailed(
                        f"{step.algorithm} mismatch: expected {expected}, got {digest}"
                    )
                plan["digest"] = digest
            elif isinstance(step, PushStep):
                self._push(context, index, step, current, plan)
            elif isinstance(step, DeleteStep):
                if not plan:
                    plan["deleted"] = relative_to(self.data_dir, current)
                    self._plan(context, index, plan)
                    fault_point("after-plan")
                current.unlink(missing_ok=True)
                fault_point("after-move-before-commit")
            else:
                assert_never(step)
        except OSError as exc:  # the local file system: may pass (a full disk, a lost mount)
            self._retry_or_fail(context, index, step.retry, plan, f"{step.kind}: {exc}")
            raise StepFailed(f"{step.kind} failed: {exc}") from exc
        plan["path"] = relative_to(self.data_dir, result)
        # Committed with the next step's plan, or with the event.
        self._save(context.session, event.id, index, plan, done=True)
        return result

    def _plan(self, context: _Context, index: int, plan: dict[str, Any]) -> None:
        """Commit the step's plan (and the done marks staged before it) before it acts."""
        self._save(context.session, context.event.id, index, plan)
        context.states.commit()

    def _retry_or_fail(self, context: _Context, index: int, policy: RetryPolicy,
                       plan: dict[str, Any], reason: str) -> None:  # fmt: skip
        """Within the step's attempts: record the try and reschedule the event (RetryLater,
        nothing sleeps here). Out of attempts: return, the caller fails the step."""
        tries = int(plan.get("tries", 0)) + 1
        if tries >= policy.attempts:
            return
        plan["tries"] = tries
        self._plan(context, index, plan)
        delay = policy.backoff_seconds * 2 ** (tries - 1)
        raise RetryLater(f"step {index} ({reason}); try {tries + 1} in {delay:g} s", delay)

    def _place_step(self, context: _Context, index: int, step: CopyStep | MoveStep | RenameStep,
                    current: Path, plan: dict[str, Any]) -> Path:  # fmt: skip
        keep = isinstance(step, CopyStep)
        overwrite = step.if_exists == "overwrite"
        target: Path | None = None
        if "target" in plan:  # planned before: did it act before a crash?
            target = self.data_dir / plan["target"]
            found = _placed(current, target, keep, _temporary(target, context.event.id))
            if found == "done":
                return current if keep else target
            if found == "missing":
                raise StepFailed(f"{step.kind}: {relative_to(self.data_dir, current)} is gone "
                                 f"and {plan['target']} does not hold it")  # fmt: skip
            if found == "taken" and not overwrite:
                target = self._next_name(context, index, step, plan)
        if target is None:
            target = self._first_name(context, index, step, current, plan)
        fault_point("after-plan")
        while True:
            try:
                _place(current, target, keep, overwrite, _temporary(target, context.event.id))
                break
            except FileExistsError:  # taken between our look and our link
                target = self._next_name(context, index, step, plan)
        fault_point("after-move-before-commit")
        if target.name != Path(plan["desired"]).name:
            context.notes.append(f"{step.kind}: {plan['desired']} existed; "
                                 f"placed as {plan['target']}")  # fmt: skip
        elif overwrite and plan.get("replaced"):
            context.notes.append(f"{step.kind}: replaced {plan['target']}")
        return current if keep else target

    def _first_name(self, context: _Context, index: int, step: CopyStep | MoveStep | RenameStep,
                    current: Path, plan: dict[str, Any]) -> Path:  # fmt: skip
        if isinstance(step, RenameStep):
            event = context.event
            assert context.route.id is not None
            counter = claims.next_counter(context.session.connection(), context.route.id)
            name = render(step.template, current.name, event.created_at.astimezone(UTC),
                          counter, event.id, event.cycle_id)  # fmt: skip
            desired = current.parent / name
        else:
            desired = self._folder(step.folder) / current.name
        plan["desired"] = relative_to(self.data_dir, desired)
        if desired == current or not _taken(desired):
            plan["target"] = plan["desired"]
            self._plan(context, index, plan)
            return desired
        if step.if_exists == "overwrite":
            plan["target"], plan["replaced"] = plan["desired"], True
            self._plan(context, index, plan)
            return desired
        return self._next_name(context, index, step, plan)

    def _next_name(self, context: _Context, index: int, step: CopyStep | MoveStep | RenameStep,
                   plan: dict[str, Any]) -> Path:  # fmt: skip
        """The desired name is taken: fail, or plan the next free versioned name."""
        desired = self.data_dir / plan["desired"]
        if step.if_exists != "version":
            raise StepFailed(f"{step.kind}: {plan['desired']} exists (if_exists: "
                             f"{step.if_exists}); the file stays where it was")  # fmt: skip
        for version in range(1, MAX_VERSIONS + 1):
            candidate = desired.with_name(versioned(desired.name, version))
            if not _taken(candidate):
                plan["target"] = relative_to(self.data_dir, candidate)
                self._plan(context, index, plan)
                return candidate
        raise StepFailed(f"{step.kind}: {plan['desired']} and {MAX_VERSIONS} versions exist")

    def _push(self, context: _Context, index: int, step: PushStep, current: Path,
              plan: dict[str, Any]) -> None:  # fmt: skip
        # Imported here: asyncssh costs ~15 MB, and only servers that push need it.
        from services.transaction_manager import partners

        event, states = context.event, context.states
        partner = context.session.get(Partner, step.partner)
        leg_key = f"{event.id}:push:{index}"
        leg = dict(context.common, leg=f"push:{index}", direction="outbound",
                   partner=step.partner,
                   protocol=partner.protocol if partner else "unknown")  # fmt: skip
        if partner is None:
            states.stage(leg_key, FAILED, detail="unknown partner", **leg)
            raise StepFailed(f"unknown partner {step.partner!r}")
        try:
            if "remote_name" not in plan:
                plan["remote_name"] = render(step.remote_name, current.name,
                                             event.created_at.astimezone(UTC), 0, event.id,
                                             event.cycle_id)  # fmt: skip
                plan["size"] = current.stat().st_size
                states.stage(leg_key, SENDING, **leg)
                self._plan(context, index, plan)  # SENDING announced before the (long) push
                fault_point("after-plan")
            elif partners.remote_size(partner, plan["remote_name"]) == plan["size"]:
                # Pushed before a crash (or a lost confirm): recognised, not sent again.
                states.stage(leg_key, SENT, **{**leg, "bytes": plan["size"], "detail": ""})
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
                self._retry_or_fail(context, index, step.retry, plan, str(exc))
            states.stage(leg_key, FAILED, detail=str(exc)[:2000], **leg)
            raise StepFailed(f"push to {step.partner} failed: {exc}") from exc
        fault_point("after-push-before-record")
        fault_point(f"after-push-before-record:{partner.protocol}")
        states.stage(leg_key, SENT, **{**leg, "bytes": sent, "detail": ""})

    def _folder(self, folder: str) -> Path:
        try:
            path = confined(self.data_dir, folder)
        except PathError as exc:
            raise StepFailed(str(exc)) from exc
        path.mkdir(parents=True, exist_ok=True)
        return path

    @staticmethod
    def _save(session: Session, event_id: str, index: int, plan: dict[str, Any],
              done: bool = False) -> None:  # fmt: skip
        """Stage a step's plan or result in the session (the caller commits)."""
        run = session.get(StepRun, (event_id, index)) or StepRun(
            event_id=event_id, step_index=index
        )
        run.result = json.dumps(plan)
        run.status = StepRunStatus.DONE if done else StepRunStatus.PLANNED
        session.add(run)


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
    target.parent.mkdir(parents=True, exist_ok=True)
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


class _States:
    """The leg states of one event: staged in its session, published once committed."""

    def __init__(self, transfer_log: TransferLog, session: Session, event_id: str, owner: str,
                 claim_seconds: float) -> None:  # fmt: skip
        self.log = transfer_log
        self.session = session
        self.event_id = event_id
        self.owner = owner
        self.claim_seconds = claim_seconds
        self._staged: list[StagedLeg] = []
        self._futures: list[Future[Any]] = []

    def stage(self, leg_key: str, status: str, **fields: Any) -> None:
        staged = self.log.stage(self.session, leg_key, status, **fields)
        if staged is not None:
            self._staged.append(staged)

    def commit(self, final: bool = False) -> None:
        """Commit while the event's claim is still ours (ClaimLost otherwise): renewed, or
        dropped with the final commit."""
        if final:
            claims.finish(self.session, self.event_id, self.owner)
        else:
            claims.renew(self.session, self.event_id, self.owner, self.claim_seconds)
        self.session.commit()
        self._futures += [self.log.publish(leg) for leg in self._staged]
        self._staged.clear()

    def wait(self) -> None:
        settle(self._futures)


def _digest(path: Path, algorithm: str) -> str:
    hasher = hashlib.new(algorithm)
    with path.open("rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _size(path: Path, fallback: int | None) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return fallback or 0
