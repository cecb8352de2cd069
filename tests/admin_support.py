"""Administrators and tokens for tests that call the APIs in-process."""

from __future__ import annotations

from sqlalchemy.engine import Engine
from sqlmodel import Session

from ferrylink.admin_auth import create_admin, issue_token


def admin_headers(engine: Engine, name: str = "root", role: str = "admin") -> dict[str, str]:
    """A new administrator with `role`, and the Authorization header of a token of theirs."""
    with Session(engine) as session:
        create_admin(session, name, "a-long-test-password", role)
        token, _row = issue_token(session, name)
        session.commit()
    return {"Authorization": f"Bearer {token}"}
