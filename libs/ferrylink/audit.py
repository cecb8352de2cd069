"""The audit log: every administrative change, who made it, when, from which address, and
the changed thing before and after (secrets masked), in the shared database.

Routers take `audit: AuditDep` and call `audit.record(session, action, target, before,
after)` before they commit, so the record and the change commit together (a change never
happens unrecorded, a record never describes a change that rolled back)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel
from sqlmodel import Session

from ferrylink.admin_auth import PrincipalDep
from ferrylink.tables.admin import AuditRecord

# Field names whose values never reach the audit log (nor any log).
SECRET_FIELDS = frozenset({
    "password", "password_hash", "private_key", "private_key_passphrase", "passphrase",
    "secret", "secret_sha256", "token",
})  # fmt: skip
MASK = "***"
CHANGED_MASK = "*** (changed)"


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


def snapshot(thing: Any) -> dict[str, Any] | None:
    """A JSON-able dict of a row or a model (None stays None)."""
    if thing is None:
        return None
    if isinstance(thing, BaseModel):
        return thing.model_dump(mode="json")
    return dict(json.loads(json.dumps(thing, default=str)))


def masked(
    before: dict[str, Any] | None, after: dict[str, Any] | None
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Both sides with every secret replaced: `***` when set, `*** (changed)` on the after
    side when it differs from before, so a rotation shows without showing the secret."""

    def hide(side: dict[str, Any] | None, other: dict[str, Any] | None) -> dict[str, Any] | None:
        if side is None:
            return None
        shown: dict[str, Any] = {}
        for key, value in side.items():
            if key in SECRET_FIELDS and value:
                changed = other is not None and other.get(key) != value and side is after
                shown[key] = CHANGED_MASK if changed else MASK
            elif isinstance(value, dict):
                shown[key] = hide(value, None)
            else:
                shown[key] = value
        return shown

    return hide(before, after), hide(after, before)


@dataclass(frozen=True)
class Auditor:
    """Writes audit records for the request's administrator and client address."""

    actor: str
    address: str

    def record(
        self,
        session: Session,
        action: str,
        target: str,
        before: Any = None,
        after: Any = None,
    ) -> AuditRecord:
        """Add the record to `session` (committed with the change by the caller)."""
        shown_before, shown_after = masked(snapshot(before), snapshot(after))
        row = AuditRecord(
            actor=self.actor,
            address=self.address[:64],
            action=action,
            target=str(target)[:255],
            before_json=json.dumps(shown_before) if shown_before is not None else None,
            after_json=json.dumps(shown_after) if shown_after is not None else None,
        )
        session.add(row)
        return row


def get_auditor(request: Request, principal: PrincipalDep) -> Auditor:
    return Auditor(actor=principal.admin, address=client_address(request))


AuditDep = Annotated[Auditor, Depends(get_auditor)]


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    address: str
    action: str
    target: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


def audit_out(row: AuditRecord) -> AuditOut:
    assert row.id is not None
    return AuditOut(
        id=row.id, at=row.at, actor=row.actor, address=row.address, action=row.action,
        target=row.target, before=json.loads(row.before_json) if row.before_json else None,
        after=json.loads(row.after_json) if row.after_json else None,
    )  # fmt: skip
