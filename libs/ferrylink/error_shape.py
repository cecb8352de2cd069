"""One error shape for every 4xx and 5xx of every service (the edge's APIs included):

    {"error": {"status": 422, "message": "what went wrong", "details": [...] | null}}

Kept apart from api_app so the edge, which has no database, need not import SQLAlchemy.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)


def error_body(status: int, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"status": status, "message": message, "details": details}}


def error_response(
    status: int, message: str, details: Any = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(status, message, details), status_code=status, headers=headers)


def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if isinstance(exc.detail, str):
        message, details = exc.detail, None
    else:  # structured detail: keep it, under a generic message
        message, details = HTTPStatus(exc.status_code).phrase, jsonable_encoder(exc.detail)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(exc.status_code, message, details, headers=headers)


def _field(error: dict[str, Any]) -> str:
    where = [str(part) for part in error.get("loc", ()) if part not in ("body",)]
    return ".".join(where) or "body"


def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = [
        {"field": _field(e), "message": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    message = "; ".join(f"{e['field']}: {e['message']}" for e in errors) or "invalid request"
    return error_response(422, message, errors)


def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
