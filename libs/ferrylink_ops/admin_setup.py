"""Administrators from the command line: the first admin of a local cluster (`ferrylink
up` writes its credentials to STATE_DIR/admin/), `ferrylink admin create|token` for real
deployments, and reading the local cluster's token for the tooling's own API calls."""

from __future__ import annotations

import json
import os
import secrets
from datetime import timedelta
from pathlib import Path

from sqlmodel import Session

from ferrylink.admin_auth import admins_exist, check_token, create_admin, issue_token, utc
from ferrylink.db import make_engine
from ferrylink.schema import prepare_schema

FIRST_ADMIN = "admin"
LOCAL_TOKEN_TTL = timedelta(days=365)


def admin_dir(state_dir: Path) -> Path:
    return state_dir / "admin"


def _write_private(path: Path, text: str) -> None:
    """Write a file only its owner can read (created so, never world-readable in between)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as stream:
        stream.write(text)
    os.replace(tmp, path)


def ensure_first_admin(database_url: str, state_dir: Path) -> Path:
    """A local cluster's first administrator and a long-lived token, written to
    STATE_DIR/admin/credentials.json (and the token alone to STATE_DIR/admin/token).
    Kept when the token still works (a restarted cluster); otherwise a new token is issued,
    and the admin created if the database has none. Returns the credentials file."""
    folder = admin_dir(state_dir)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    credentials = folder / "credentials.json"
    engine = make_engine(database_url)
    try:
        prepare_schema(engine, upgrade=False)  # `ferrylink up` upgraded it just before
        with Session(engine) as session:
            if credentials.exists():
                known = json.loads(credentials.read_text())
                if check_token(session, known.get("token", "")) is not None:
                    return credentials
            else:
                known = {}
            password = known.get("password")
            if not admins_exist(session):
                password = secrets.token_urlsafe(18)
                create_admin(session, FIRST_ADMIN, password, "admin")
            token, row = issue_token(
                session, known.get("name", FIRST_ADMIN), LOCAL_TOKEN_TTL, "ferrylink up"
            )
            session.commit()
            doc = {"name": known.get("name", FIRST_ADMIN), "password": password, "token": token,
                   "expires_at": utc(row.expires_at).isoformat()}  # fmt: skip
    finally:
        engine.dispose()
    _write_private(credentials, json.dumps(doc, indent=2) + "\n")
    _write_private(folder / "token", token + "\n")
    return credentials


def local_token(state_dir: Path) -> str | None:
    """The local cluster's admin token, if `ferrylink up` wrote one."""
    try:
        return (admin_dir(state_dir) / "token").read_text().strip() or None
    except OSError:
        return None


def auth_headers(state_dir: Path | str | None) -> dict[str, str]:
    token = local_token(Path(state_dir)) if state_dir else None
    return {"Authorization": f"Bearer {token}"} if token else {}


def create_admin_cli(database_url: str, name: str, role: str, password: str) -> None:
    engine = make_engine(database_url)
    try:
        # A new database is created; an older one is left to `ferrylink db upgrade`.
        prepare_schema(engine, upgrade=False)
        with Session(engine) as session:
            create_admin(session, name, password, role)
            session.commit()
    finally:
        engine.dispose()


def issue_token_cli(database_url: str, name: str, ttl: timedelta, description: str) -> str:
    from ferrylink.admin_auth import AdminError
    from ferrylink.models import AdminUser

    engine = make_engine(database_url)
    try:
        with Session(engine) as session:
            admin = session.get(AdminUser, name)
            if admin is None or not admin.enabled:
                raise AdminError(f"no enabled administrator {name!r}")
            token, _row = issue_token(session, name, ttl, description)
            session.commit()
            return token
    finally:
        engine.dispose()
