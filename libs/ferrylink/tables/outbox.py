"""Messages committed with the database work that produced them, published after the commit
(ferrylink.outbox)."""

from __future__ import annotations

from sqlmodel import Field, SQLModel


class OutboxMessage(SQLModel, table=True):
    """A message written in the transaction that records its cause (an upload's event with
    its RECEIVED leg) and published from here until the broker confirmed it: a crash or a
    failed publish after the commit delays the message, never loses it."""

    __tablename__ = "outbox"
    __table_args__ = {"sqlite_autoincrement": True}

    id: int | None = Field(default=None, primary_key=True)
    routing_key: str = Field(max_length=255)
    body: bytes
    message_id: str = Field(max_length=200)
    headers_json: str = Field(default="{}")
    created_at: float = Field(index=True)
