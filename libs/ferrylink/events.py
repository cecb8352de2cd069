"""The event message: small, schema-versioned JSON; files themselves stay on shared storage."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ferrylink.consumer_manager import Delivery, RejectMessage
from ferrylink.models import utcnow

SCHEMA_VERSION = 1

EventKind = Literal["file.arrived", "transfer.scheduled", "maintenance.run"]


class Event(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=1, max_length=64)
    kind: EventKind
    account: str = Field(default="", max_length=128)
    path: str = Field(default="", max_length=4096)
    size: int | None = Field(default=None, ge=0)
    checksum: str | None = Field(default=None, max_length=128)
    cycle_id: str = Field(default_factory=lambda: uuid.uuid4().hex, max_length=64)
    # Kind-specific parameters, e.g. a scheduled transfer's job id, fire time and partner.
    params: dict[str, str] = Field(default_factory=dict)
    created_at: datetime = Field(default_factory=utcnow)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def parse_event(delivery: Delivery) -> Event:
    """Validate a delivered event; anything malformed is rejected to the dead-letter queue."""
    data = delivery.json()
    if not isinstance(data, dict):
        raise RejectMessage("an event must be a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RejectMessage(f"unknown schema version {version!r} (this server reads 1)")
    try:
        return Event.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'event'}: {e['msg']}" for e in exc.errors()
        )
        raise RejectMessage(f"invalid event: {problems}") from exc
