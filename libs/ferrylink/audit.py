"""The audit log: who changed what, when, from which address, before and after.

Written in the caller's transaction, so a change and its record commit together. Values
whose key looks like a secret are masked before they are stored.
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from sqlmodel import Session

from ferrylink.admin_auth import Principal
from ferrylink.models import AuditRecord

SECRET_KEYS = ("password", "private_key", "secret", "token", "passphrase")
MASK = "***"


def masked(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: MASK if any(s in str(k).lower() for s in SECRET_KEYS) and v else masked(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [masked(v) for v in value]
    return value


def record(
    session: Session,
    request: Request,
    action: str,
    target: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> AuditRecord:
    """Add one audit record for the request's administrator (the caller commits)."""
    principal: Principal | None = getattr(request.state, "principal", None)
    row = AuditRecord(
        actor=principal.admin if principal else "unknown",
        address=request.client.host if request.client else "",
        action=action,
        target=target[:255],
        before_json=json.dumps(masked(before), default=str) if before is not None else None,
        after_json=json.dumps(masked(after), default=str) if after is not None else None,
    )
    session.add(row)
    return row
