"""The web UI's login session.

The administrator's API token (from the same login as `POST /auth/token`) is kept in an
HttpOnly cookie: no script can read it, so an injected script cannot carry a cluster-wide
token away (sessionStorage would hand it to any script). The cookie is SameSite=Strict and
limited to `/ui`; a cookie is still sent automatically, so every write also needs the
session's CSRF token in a header (`X-CSRF-Token`), a value derived from the token that only
pages of this origin are given, and a cross-origin `Origin` is refused outright.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from sqlmodel import Session

from ferrylink.admin_auth import Principal, check_token
from ferrylink.deps import SessionDep

COOKIE = "ferrylink_ui"
COOKIE_PATH = "/ui"
CSRF_HEADER = "x-csrf-token"


class LoginRequired(Exception):
    """No valid session: pages redirect to the login page, fragments answer 401."""


def csrf_token(token: str) -> str:
    return hashlib.sha256(b"ferrylink-ui-csrf:" + token.encode()).hexdigest()


def current(request: Request, session: Session) -> tuple[Principal, str] | None:
    token = request.cookies.get(COOKIE, "")
    principal = check_token(session, token) if token else None
    return (principal, token) if principal is not None else None


class WebSession:
    def __init__(self, principal: Principal, token: str) -> None:
        self.principal = principal
        self.token = token
        self.csrf = csrf_token(token)

    @property
    def headers(self) -> dict[str, str]:
        """What calls to the services carry: this administrator's own token."""
        return {"Authorization": f"Bearer {self.token}"}


def require_session(request: Request, session: SessionDep) -> WebSession:
    found = current(request, session)
    if found is None:
        raise LoginRequired()
    request.state.principal = found[0]
    return WebSession(*found)


def same_origin(request: Request) -> None:
    """Refuse a write whose Origin (sent by browsers on POST) is another site."""
    origin = request.headers.get("origin")
    if origin and origin != f"{request.url.scheme}://{request.headers.get('host', '')}":
        raise HTTPException(403, "cross-origin request refused")


def require_write(
    request: Request, web: Annotated[WebSession, Depends(require_session)]
) -> WebSession:
    same_origin(request)
    sent = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(sent, web.csrf):
        raise HTTPException(403, "missing or wrong CSRF token; reload the page")
    return web


WebDep = Annotated[WebSession, Depends(require_session)]
WriteDep = Annotated[WebSession, Depends(require_write)]
