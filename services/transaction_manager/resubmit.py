"""Resubmitting a failed transfer: its route runs again from the step where it stopped.

The event of a failed transfer is complete (a `processed_event` row) and its done steps are
recorded (`step_run`). Resubmitting removes the completion mark, clears the failed step's
attempt count and republishes the same event (same id and cycle id) through the outbox, in
one transaction with the audit record. The claim/plan machinery (routing.py) then skips the
done steps and resumes at the failed one; a planned push first asks the partner whether the
file is there already, so a resubmit never sends twice what had arrived.

The cycle's FAILED legs become TO_EXECUTE in the same transaction, announced like any state:
the transfer log and tracking show the resubmission at once, and its outcome is a new state
of each leg (FAILED again included), never a repeat of the first attempt's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import PurePosixPath

from sqlmodel import Session, select

from ferrylink.clock import as_utc
from ferrylink.contracts import FileArrived, StepRunStatus, TransferStatus
from ferrylink.tables.accounts import Account
from ferrylink.tables.events import ProcessedEvent
from ferrylink.tables.transfers import StepRun, Transfer
from services.transaction_manager.routing import RouteRunner
from services.transaction_manager.steps import STEPS, ChecksumStep
from services.transaction_manager.transfer_log import StagedLeg, TransferLog


class ResubmitRefused(Exception):
    """Why this cycle cannot be resubmitted; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Resubmission:
    event: FileArrived
    failed_step: int
    detail: str
    # The FAILED legs' TO_EXECUTE states: `transfer_log.publish` each once committed.
    states: list[StagedLeg]


def prepare(session: Session, cycle_id: str, transfer_log: TransferLog) -> Resubmission:
    """Reset the failed cycle's event and its failed legs in `session` (not committed) and
    return the event to publish; ResubmitRefused when the cycle is unknown, not failed, or
    cannot be re-run."""
    legs = {
        leg.leg: leg for leg in session.exec(select(Transfer).where(Transfer.cycle_id == cycle_id))
    }
    if not legs:
        raise ResubmitRefused(404, f"no transfer with cycle id {cycle_id!r}")
    receive, route_leg = legs.get("receive"), legs.get("route")
    if receive is None or route_leg is None:
        raise ResubmitRefused(409, "only a routed file transfer (receive and route legs) can "
                                   "be resubmitted")  # fmt: skip
    if route_leg.status != TransferStatus.FAILED:
        raise ResubmitRefused(409, f"the transfer's route is {route_leg.status}; only a FAILED "
                                   "transfer is resubmitted")  # fmt: skip
    event_id = route_leg.event_id
    if session.get(Account, receive.account) is None:
        raise ResubmitRefused(409, f"account {receive.account!r} no longer exists")
    route = RouteRunner._route_for(session, receive.account, PurePosixPath(receive.file_name).name)
    if route is None:
        raise ResubmitRefused(409, f"no enabled route of {receive.account!r} matches "
                                   f"{receive.file_name!r} any more")  # fmt: skip
    steps = STEPS.validate_json(route.steps_json)
    runs = {
        run.step_index: run
        for run in session.exec(select(StepRun).where(StepRun.event_id == event_id))
    }
    failed_step = next(
        (i for i in range(len(steps))
         if i not in runs or runs[i].status != StepRunStatus.DONE),
        None,
    )  # fmt: skip
    if failed_step is None:
        raise ResubmitRefused(409, "every step of the route is done; nothing to resubmit")
    step = steps[failed_step]
    if isinstance(step, ChecksumStep) and step.expected == "event":
        # The upload's checksum is not kept; re-running without it would skip the check.
        raise ResubmitRefused(
            409,
            f"step {failed_step} checks the upload's own checksum, "
            "which is not kept: the partner must send the file again",
        )
    for index in sorted(runs):
        run = runs[index]
        if run.status == StepRunStatus.DONE:
            continue
        plan = json.loads(run.result) if run.result else {}
        plan.pop("tries", None)  # a fresh set of attempts for the step
        run.result = json.dumps(plan)
        session.add(run)
    done = session.get(ProcessedEvent, event_id)
    if done is not None:
        session.delete(done)
    detail = route_leg.detail
    states: list[StagedLeg] = []
    for leg in legs.values():
        if leg.status != TransferStatus.FAILED:
            continue
        staged = transfer_log.stage(session, leg.leg_key, TransferStatus.TO_EXECUTE,
                                    detail="resubmitted", finished_at=None,
                                    duration_ms=None)  # fmt: skip
        if staged is not None:
            states.append(staged)
    event = FileArrived(
        id=event_id,
        cycle_id=cycle_id,
        created_at=as_utc(receive.started_at),
        account=receive.account,
        path=receive.file_name,
        size=receive.bytes or None,
        protocol=receive.protocol,
    )
    return Resubmission(event, failed_step, detail, states)
