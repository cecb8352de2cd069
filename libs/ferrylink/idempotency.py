"""`Idempotency-Key`: a client retrying a request (a create, an upload) after a timeout or a
dropped connection sends the same key, and gets the first request's answer instead of a
second account, job or file. ASGI middleware, so uploads stream through untouched.

- The key is scoped by who asks (the Authorization header), the method and the path: one
  caller can never read another's answer.
- The first request claims the key (an INSERT on the primary key, so two servers racing
  with the same key cannot both act); a retry while it runs gets 409.
- A success (status < 400) is stored with the SHA-256 of the request body; a retry with
  the same body gets it again (`Idempotent-Replayed: true`), with another body 422. A
  refused or failed request releases the key: it did not act, the client may fix and retry.
- Records expire (`ttl`); a claim whose request died with its process is taken over after
  `stale_claim`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable

from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, delete
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ferrylink.tables.admin import IdempotencyRecord

HEADER = b"idempotency-key"
METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
MAX_KEY_LENGTH = 255
MAX_STORED_BODY = 1 << 20
DEFAULT_TTL = 24 * 3600.0
DEFAULT_STALE_CLAIM = 3600.0
ErrorResponse = Callable[[int, str], ASGIApp]


class Idempotency:
    def __init__(
        self,
        app: ASGIApp,
        engine: Callable[[], Engine],
        error: ErrorResponse,
        ttl: float = DEFAULT_TTL,
        stale_claim: float = DEFAULT_STALE_CLAIM,
    ) -> None:
        self.app = app
        self.engine = engine
        self.error = error
        self.ttl = ttl
        self.stale_claim = stale_claim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"]) if scope["type"] == "http" else {}
        given = headers.get(HEADER)
        if given is None or scope["method"] not in METHODS:
            await self.app(scope, receive, send)
            return
        if not 0 < len(given) <= MAX_KEY_LENGTH or not given.isascii():
            await self.error(400, f"Idempotency-Key: 1 to {MAX_KEY_LENGTH} ASCII characters")(
                scope, receive, send
            )
            return
        scoped = hashlib.sha256(
            b"\0".join(
                [
                    headers.get(b"authorization", b""),
                    scope["method"].encode(),
                    scope["path"].encode(),
                    given,
                ]
            )  # fmt: skip
        ).hexdigest()
        existing = await run_in_threadpool(self._claim, scoped)
        if existing is not None:
            await self._answer_retry(existing, scope, receive, send)
            return
        await self._first(scoped, scope, receive, send)

    async def _first(self, key: str, scope: Scope, receive: Receive, send: Send) -> None:
        digest = hashlib.sha256()
        status = 0
        response_headers: list[tuple[bytes, bytes]] = []
        body = bytearray()

        async def hashing_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                digest.update(message.get("body", b""))
            return message

        async def capturing_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                response_headers.extend(message.get("headers", []))
            elif message["type"] == "http.response.body" and len(body) <= MAX_STORED_BODY:
                body.extend(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, hashing_receive, capturing_send)
        finally:
            keep = 0 < status < 400 and len(body) <= MAX_STORED_BODY
            await run_in_threadpool(
                self._finish, key, keep, digest.hexdigest(), status, response_headers, bytes(body)
            )

    async def _answer_retry(
        self, record: IdempotencyRecord, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if record.status == 0:
            await self.error(409, "a request with this Idempotency-Key is still under way")(
                scope, receive, send
            )
            return
        # Read the retried body (the client sends it again) to make sure it is the same.
        digest = hashlib.sha256()
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            digest.update(message.get("body", b""))
            if not message.get("more_body", False):
                break
        if digest.hexdigest() != record.request_sha256:
            await self.error(
                422, "this Idempotency-Key was used with another request body; use a new key"
            )(scope, receive, send)
            return
        stored = [(k.encode("latin-1"), v.encode("latin-1"))
                  for k, v in json.loads(record.headers_json)]  # fmt: skip
        await send({"type": "http.response.start", "status": record.status,
                    "headers": [*stored, (b"idempotent-replayed", b"true")]})  # fmt: skip
        await send({"type": "http.response.body", "body": record.body})

    def _claim(self, key: str) -> IdempotencyRecord | None:
        """None when this request claimed the key (it runs), else the record that holds it."""
        now = time.time()
        with Session(self.engine(), expire_on_commit=False) as session:
            session.exec(delete(IdempotencyRecord).where(col(IdempotencyRecord.expires_at) < now))
            stale = now - self.stale_claim
            session.exec(
                delete(IdempotencyRecord).where(
                    col(IdempotencyRecord.key) == key,
                    col(IdempotencyRecord.status) == 0,
                    col(IdempotencyRecord.created_at) < stale,
                )
            )
            session.commit()
            session.add(IdempotencyRecord(key=key, created_at=now, expires_at=now + self.ttl))
            try:
                session.commit()
                return None
            except IntegrityError:
                session.rollback()
            found = session.get(IdempotencyRecord, key)
            # Released between our INSERT and this read: treat as under way, the client retries.
            return found or IdempotencyRecord(key=key, created_at=now, expires_at=now)

    def _finish(self, key: str, keep: bool, request_sha256: str, status: int,
                headers: list[tuple[bytes, bytes]], body: bytes) -> None:  # fmt: skip
        with Session(self.engine()) as session:
            record = session.get(IdempotencyRecord, key)
            if record is None:
                return
            if keep:
                record.status = status
                record.request_sha256 = request_sha256
                record.headers_json = json.dumps(
                    [(k.decode("latin-1"), v.decode("latin-1")) for k, v in headers]
                )
                record.body = body
                session.add(record)
            else:
                session.delete(record)
            session.commit()
