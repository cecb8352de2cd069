"""Running an arrived file through its route, once, even when its event comes again.

Every step follows plan -> act -> done: the step's result (e.g. the new path of a renamed
file) is committed as "planned" before the side effect, and "done" after it. A redelivered
event skips done steps, and redoes a planned one idempotently (the source still there: do it;
already at the target: it was done). So a crash at any point neither loses nor repeats a step.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future
from datetime import UTC
from pathlib import Path
from typing import Any, TypeVar, assert_never

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from ferrylink.contracts import FileArrived, RejectMessage, StepRunStatus
from ferrylink.models import (
    Account,
    ClusterSetting,
    Partner,
    ProcessedEvent,
    Route,
    StepRun,
    Transfer,
)
from ferrylink.paths import PathError, confined, relative_to
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
)
from services.transaction_manager.transfer_log import (
    FAILED,
    RECEIVED,
    ROUTED,
    SENDING,
    SENT,
    TransferLog,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


class StepFailed(Exception):
    """A step that cannot succeed (bad checksum, unknown partner, push out of retries): the
    transfer is marked FAILED and the route stops; the event itself is complete."""


class RouteRunner:
    def __init__(self, engine: Engine, data_dir: Path, transfer_log: TransferLog,
                 node_id: str) -> None:  # fmt: skip
        self.engine = engine
        self.data_dir = data_dir
        self.log = transfer_log
        self.node_id = node_id

    # -- the event -----------------------------------------------------------------------------

    def process(self, event: FileArrived) -> bool:
        """Route the file of a `file.arrived` event; False if it had been done before.

        One commit completes the event (its legs, its steps' results, its processed_event
        row) unless a step must record a plan first (rename, push). State changes are
        published once committed, and confirmed before this returns (and the event is acked).
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
            states = _States(self.log, session)
            states.stage(f"{event.id}:receive", RECEIVED, leg="receive", direction="inbound",
                         protocol=event.protocol, **common)  # fmt: skip
            route = self._route_for(session, account.name, Path(event.path).name)
            if route is None:
                log.info("no route for %s/%s: it stays in the home", account.name, event.path)
            else:
                status, detail = ROUTED, ""
                try:
                    current = source
                    for index, step in enumerate(STEPS.validate_json(route.steps_json)):
                        current = self._run_step(states, event, route, index, step, current,
                                                 common)  # fmt: skip
                except StepFailed as exc:
                    log.warning("transfer of %s failed: %s", event.path, exc)
                    status, detail = FAILED, str(exc)[:2000]
                states.stage(f"{event.id}:route", status, leg="route", direction="internal",
                             protocol="file", detail=detail, **common)  # fmt: skip
            session.add(ProcessedEvent(event_id=event.id, kind=event.kind, node_id=self.node_id,
                                       processed_at=time.time()))  # fmt: skip
            states.commit()
        states.wait()
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

    def _run_step(self, states: _States, event: FileArrived, route: Route, index: int, step: Step,
                  current: Path, common: dict[str, Any]) -> Path:  # fmt: skip
        session = states.session
        run = session.get(StepRun, (event.id, index))
        if run is not None and run.status == StepRunStatus.DONE:
            return self.data_dir / json.loads(run.result)["path"]
        plan: dict[str, Any] = json.loads(run.result) if run is not None else {}
        if isinstance(step, CopyStep | MoveStep):
            # The target follows from the previous steps' results: nothing to plan ahead.
            folder = self._folder(step.folder)
            plan.setdefault("target", relative_to(self.data_dir, folder / current.name))
            target = self.data_dir / plan["target"]
            with_retry(step.retry, lambda: _place(current, target, keep=isinstance(step, CopyStep)))
            result = current if isinstance(step, CopyStep) else target
        elif isinstance(step, RenameStep):
            if "target" not in plan:
                name = render(
                    step.template,
                    current.name,
                    event.created_at.astimezone(UTC),
                    _next_counter(session, route),
                    event.id,
                    event.cycle_id,
                )
                plan["target"] = relative_to(self.data_dir, current.parent / name)
                # The counter is spent: commit the plan before renaming.
                self._save(session, event.id, index, plan)
                states.commit()
            target = self.data_dir / plan["target"]
            with_retry(step.retry, lambda: _place(current, target, keep=False))
            result = target
        elif isinstance(step, ChecksumStep):
            digest = with_retry(step.retry, lambda: _digest(current, step.algorithm))
            expected = event.checksum if step.expected == "event" else step.expected
            if expected and expected.lower() != digest:
                raise StepFailed(f"{step.algorithm} mismatch: expected {expected}, got {digest}")
            plan["digest"] = digest
            result = current
        elif isinstance(step, PushStep):
            self._push(states, event, index, step, current, plan, common)
            result = current
        elif isinstance(step, DeleteStep):
            with_retry(step.retry, lambda: current.unlink(missing_ok=True))
            result = current
        else:
            assert_never(step)
        plan["path"] = relative_to(self.data_dir, result)
        self._save(session, event.id, index, plan, done=True)  # committed with the event
        return result

    def _push(self, states: _States, event: FileArrived, index: int, step: PushStep, current: Path,
              plan: dict[str, Any], common: dict[str, Any]) -> None:  # fmt: skip
        # Imported here: asyncssh costs ~15 MB, and only servers that push need it.
        from services.transaction_manager import partners

        session = states.session
        partner = session.get(Partner, step.partner)
        leg_key = f"{event.id}:push:{index}"
        leg = dict(common, leg=f"push:{index}", direction="outbound", partner=step.partner,
                   protocol=partner.protocol if partner else "unknown")  # fmt: skip
        if partner is None:
            states.stage(leg_key, FAILED, detail="unknown partner", **leg)
            raise StepFailed(f"unknown partner {step.partner!r}")
        remote_name = plan.setdefault(
            "remote_name",
            render(step.remote_name, current.name, event.created_at.astimezone(UTC), 0,
                   event.id, event.cycle_id),
        )  # fmt: skip
        self._save(session, event.id, index, plan)
        states.stage(leg_key, SENDING, **leg)
        states.commit()  # the plan, and SENDING announced, before the (long) push
        try:
            sent = with_retry(step.retry, lambda: partners.push_file(partner, current, remote_name),
                              retry_on=lambda e: isinstance(e, partners.PartnerError)
                              and e.retryable)  # fmt: skip
        except (partners.PartnerError, OSError) as exc:
            states.stage(leg_key, FAILED, detail=str(exc)[:2000])
            raise StepFailed(f"push to {step.partner} failed: {exc}") from exc
        states.stage(leg_key, SENT, bytes=sent)

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


class _States:
    """The leg states of one event: staged in its session, published once committed."""

    def __init__(self, transfer_log: TransferLog, session: Session) -> None:
        self.log = transfer_log
        self.session = session
        self._staged: list[Transfer] = []
        self._futures: list[Future[Any]] = []

    def stage(self, leg_key: str, status: str, **fields: Any) -> None:
        leg = self.log.stage(self.session, leg_key, status, **fields)
        if leg is not None:
            self._staged.append(leg)

    def commit(self) -> None:
        self.session.commit()
        self._futures += [self.log.publish(leg) for leg in self._staged]
        self._staged.clear()

    def wait(self) -> None:
        for future in self._futures:
            future.result(timeout=30)


def with_retry(
    policy: RetryPolicy,
    action: Callable[[], T],
    retry_on: Callable[[Exception], bool] = lambda e: isinstance(e, OSError),
) -> T:
    """Run `action`, retrying per the step's policy on errors that may pass."""
    for attempt in range(1, policy.attempts + 1):
        try:
            return action()
        except Exception as exc:
            if attempt == policy.attempts or not retry_on(exc):
                raise
            log.warning(
                "attempt %d failed (%s); retrying in %.1f s", attempt, exc, policy.backoff_seconds
            )
            time.sleep(policy.backoff_seconds)
    raise AssertionError("unreachable")


def _place(source: Path, target: Path, keep: bool) -> None:
    """Copy (keep=True) or move `source` to `target`, atomically and idempotently."""
    if not source.exists():
        if target.exists():
            return  # done before a crash
        raise FileNotFoundError(f"{source} is gone and {target} does not exist")
    target.parent.mkdir(parents=True, exist_ok=True)
    if not keep:
        try:
            os.replace(source, target)
            return
        except OSError:  # another file system: copy, then remove the source
            pass
    temporary = target.with_name(f".{target.name}.part")
    shutil.copyfile(source, temporary)
    os.replace(temporary, target)
    if not keep:
        source.unlink()


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


def _next_counter(session: Session, route: Route) -> int:
    """A per-route counter for {counter}; committed with the step's plan."""
    key = f"route.{route.id}.counter"
    row = session.get(ClusterSetting, key, with_for_update=True) or ClusterSetting(
        key=key, value="0"
    )
    row.value = str(int(row.value) + 1)
    session.add(row)
    return int(row.value)
