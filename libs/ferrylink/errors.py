"""Errors of the infrastructure, not of a message: the database locked or unreachable, the
broker gone, a publish not confirmed in time. Work that fails with one of these is tried
again after a backoff and never counted against the message (an outage parks nothing)."""

from __future__ import annotations

import pika.exceptions
from sqlalchemy import exc as sa_exc

INFRASTRUCTURE_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,  # locked, unreachable, connection lost
    sa_exc.InterfaceError,
    sa_exc.DisconnectionError,
    sa_exc.TimeoutError,  # the connection pool
    pika.exceptions.AMQPError,
    TimeoutError,  # a publish not confirmed in time
)
