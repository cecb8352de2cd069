"""The sentinel link's outbox (a row per record and endpoint) becomes one record log with a
position per endpoint: `sentinel_record.pos`, `sentinel_delivery.through_pos`; the
`sentinel_outbox` table goes, and so does the index on `sentinel_record.linked_at` (the age
bound reads records in position order).

Existing records are numbered in link order: first those no endpoint waits for (by link
time, cycle and seq), then the queued ones in outbox order (outbox ids follow link order).
Each endpoint's position is just before its first queued record, or the end of the log when
nothing is queued for it; an endpoint with queued records and no status row gets one. A
record after an endpoint's position that it had received already (it was queued only for
another endpoint) may reach it again, which receivers drop by id; none is lost.

PostgreSQL adds the columns in place. SQLite cannot add a NOT NULL column without a default
(which the models do not have), so there both tables are rebuilt: renamed aside, created as
the models make them, rows copied over.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

POSITIONS = "_sentinel_record_pos"  # record id -> position, while the migration runs
CYCLE_INDEX = "ix_sentinel_record_cycle_id"
LINKED_AT_INDEX = "ix_sentinel_record_linked_at"
RECORD_COLUMNS = ("id", "cycle_id", "seq", "body_json", "linked_at")
DELIVERY_COLUMNS = ("endpoint_id", "dropped", "delivered", "failures", "last_success_at",
                    "last_error", "last_error_at")  # fmt: skip


def record_table(name: str, *, with_pos: bool) -> None:
    extra = [sa.Column("pos", sa.BigInteger(), nullable=False)] if with_pos else []
    op.create_table(
        name,
        sa.Column("id", sa.String(length=220), nullable=False),
        sa.Column("cycle_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("body_json", sa.String(), nullable=False),
        sa.Column("linked_at", sa.Float(), nullable=False),
        *extra,
        sa.PrimaryKeyConstraint("id"),
    )


def delivery_table(name: str, *, with_position: bool) -> None:
    extra = [sa.Column("through_pos", sa.BigInteger(), nullable=False)] if with_position else []
    op.create_table(
        name,
        sa.Column("endpoint_id", sa.Integer(), nullable=False),
        sa.Column("dropped", sa.BigInteger(), nullable=False),
        sa.Column("delivered", sa.BigInteger(), nullable=False),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("last_success_at", sa.Float(), nullable=True),
        sa.Column("last_error", sa.String(length=1000), nullable=False),
        sa.Column("last_error_at", sa.Float(), nullable=True),
        *extra,
        sa.PrimaryKeyConstraint("endpoint_id"),
    )


def outbox_table() -> None:
    op.create_table(
        "sentinel_outbox",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("endpoint_id", sa.Integer(), nullable=False),
        sa.Column("record_id", sa.String(length=220), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("endpoint_id", "record_id", name="uq_sentinel_outbox_record"),
        sqlite_autoincrement=True,
    )
    op.create_index(
        "ix_sentinel_outbox_endpoint_id", "sentinel_outbox", ["endpoint_id"], unique=False
    )


def number_records() -> None:
    """Fill POSITIONS: the records in link order, queued ones last in outbox order."""
    op.create_table(
        POSITIONS,
        sa.Column("id", sa.String(length=220), nullable=False),
        sa.Column("pos", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.execute(
        f"INSERT INTO {POSITIONS} (id, pos) "
        "SELECT r.id, row_number() OVER (ORDER BY CASE WHEN q.first_id IS NULL THEN 0 ELSE 1 "
        "END, q.first_id, r.linked_at, r.cycle_id, r.seq) "
        "FROM sentinel_record r LEFT JOIN (SELECT record_id, min(id) AS first_id "
        "FROM sentinel_outbox GROUP BY record_id) q ON q.record_id = r.id"
    )


def place_endpoints() -> None:
    """Status rows for endpoints with queued records and none yet; then each position."""
    op.execute(
        "INSERT INTO sentinel_delivery (endpoint_id, dropped, delivered, failures, last_error, "
        "through_pos) SELECT DISTINCT o.endpoint_id, 0, 0, 0, '', 0 FROM sentinel_outbox o "
        "WHERE o.endpoint_id NOT IN (SELECT endpoint_id FROM sentinel_delivery)"
    )
    op.execute(
        "UPDATE sentinel_delivery SET through_pos = COALESCE("
        f"(SELECT min(p.pos) - 1 FROM sentinel_outbox o JOIN {POSITIONS} p ON p.id = o.record_id "
        "WHERE o.endpoint_id = sentinel_delivery.endpoint_id), "
        f"(SELECT max(pos) FROM {POSITIONS}), 0)"
    )


def rebuild_on_sqlite(*, with_positions: bool) -> None:
    """Both tables made anew as this revision (`with_positions`) or 0002 has them, their rows
    copied over (positions from POSITIONS)."""
    aside = "_sentinel_record_before_rebuild"
    for index in (CYCLE_INDEX, LINKED_AT_INDEX) if with_positions else (CYCLE_INDEX,):
        op.drop_index(index, table_name="sentinel_record")
    op.rename_table("sentinel_record", aside)
    record_table("sentinel_record", with_pos=with_positions)
    columns = ", ".join(RECORD_COLUMNS)
    if with_positions:
        copied = ", ".join(f"r.{column}" for column in RECORD_COLUMNS)
        op.execute(
            f"INSERT INTO sentinel_record ({columns}, pos) SELECT {copied}, p.pos "
            f"FROM {aside} r JOIN {POSITIONS} p ON p.id = r.id"
        )
    else:
        op.execute(f"INSERT INTO sentinel_record ({columns}) SELECT {columns} FROM {aside}")
    op.drop_table(aside)
    op.create_index(CYCLE_INDEX, "sentinel_record", ["cycle_id"], unique=False)
    if not with_positions:
        op.create_index(LINKED_AT_INDEX, "sentinel_record", ["linked_at"], unique=False)
    aside = "_sentinel_delivery_before_rebuild"
    columns = ", ".join(DELIVERY_COLUMNS)
    op.rename_table("sentinel_delivery", aside)
    delivery_table("sentinel_delivery", with_position=with_positions)
    position, start = (", through_pos", ", 0") if with_positions else ("", "")
    op.execute(
        f"INSERT INTO sentinel_delivery ({columns}{position}) SELECT {columns}{start} FROM {aside}"
    )
    op.drop_table(aside)


def upgrade() -> None:
    number_records()
    if op.get_context().dialect.name == "sqlite":
        rebuild_on_sqlite(with_positions=True)
    else:
        op.drop_index(LINKED_AT_INDEX, table_name="sentinel_record")
        op.add_column("sentinel_record", sa.Column("pos", sa.BigInteger(), nullable=True))
        op.execute(
            f"UPDATE sentinel_record SET pos = p.pos FROM {POSITIONS} p "
            "WHERE p.id = sentinel_record.id"
        )
        op.alter_column("sentinel_record", "pos", nullable=False)
        op.add_column(
            "sentinel_delivery",
            sa.Column("through_pos", sa.BigInteger(), nullable=False, server_default="0"),
        )
        op.alter_column("sentinel_delivery", "through_pos", server_default=None)
    op.create_index("ix_sentinel_record_pos", "sentinel_record", ["pos"], unique=True)
    place_endpoints()
    op.drop_table(POSITIONS)
    op.drop_index("ix_sentinel_outbox_endpoint_id", table_name="sentinel_outbox")
    op.drop_table("sentinel_outbox")


def downgrade() -> None:
    """Queue again, per endpoint, every record after its position."""
    outbox_table()
    op.execute(
        "INSERT INTO sentinel_outbox (endpoint_id, record_id, created_at) "
        "SELECT d.endpoint_id, r.id, r.linked_at FROM sentinel_delivery d "
        "JOIN sentinel_record r ON r.pos > d.through_pos ORDER BY r.pos, d.endpoint_id"
    )
    op.drop_index("ix_sentinel_record_pos", table_name="sentinel_record")
    if op.get_context().dialect.name == "sqlite":
        rebuild_on_sqlite(with_positions=False)
        return
    op.drop_column("sentinel_delivery", "through_pos")
    op.drop_column("sentinel_record", "pos")
    op.create_index(LINKED_AT_INDEX, "sentinel_record", ["linked_at"], unique=False)
