"""Job runs record when a transaction manager completed them and what a maintenance run
removed: `finished_at`, `removed`, `result` (and the status value `done`).

Existing runs get no completion time, no count and an empty result. PostgreSQL adds the
columns in place (`result` filled through a server default that is dropped again: the
models have none). SQLite cannot add a NOT NULL column without a default, and Alembic's
batch mode would recreate the table without AUTOINCREMENT (ids then reused) and under a
quoted name, so there the table is rebuilt by hand: renamed aside, created as the models
make it, rows and the AUTOINCREMENT sequence copied over.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_COLUMNS = ("id", "job_id", "fire_time", "status", "node_id", "event_id", "event_json",
               "claimed_at", "submitted_at")  # fmt: skip
INDEXES = (("ix_job_run_fire_time", "fire_time"), ("ix_job_run_job_id", "job_id"),
           ("ix_job_run_status", "status"))  # fmt: skip


def job_run_table(name: str, *, new_columns: bool) -> None:
    extra: list[sa.Column[object]] = []
    if new_columns:
        extra = [
            sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
            sa.Column("removed", sa.Integer(), nullable=True),
            sa.Column("result", sa.String(length=1000), nullable=False),
        ]
    op.create_table(
        name,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("fire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("node_id", sa.String(length=64), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("event_json", sa.String(), nullable=False),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("submitted_at", sa.DateTime(timezone=True), nullable=True),
        *extra,
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("job_id", "fire_time", name="uq_job_run_fire_time"),
        sqlite_autoincrement=True,
    )


def rebuild_on_sqlite(*, new_columns: bool) -> None:
    aside = "_job_run_before_rebuild"
    for index, _column in INDEXES:
        op.drop_index(index, table_name="job_run")
    op.rename_table("job_run", aside)
    job_run_table("job_run", new_columns=new_columns)
    old = ", ".join(OLD_COLUMNS)
    if new_columns:
        op.execute(
            f"INSERT INTO job_run ({old}, finished_at, removed, result) "
            f"SELECT {old}, NULL, NULL, '' FROM {aside}"
        )
    else:
        op.execute(f"INSERT INTO job_run ({old}) SELECT {old} FROM {aside}")
    # AUTOINCREMENT: ids never reused, also those of deleted runs above the highest left.
    op.execute("DELETE FROM sqlite_sequence WHERE name = 'job_run'")
    op.execute(
        f"INSERT INTO sqlite_sequence (name, seq) SELECT 'job_run', seq FROM sqlite_sequence "
        f"WHERE name = '{aside}'"
    )
    op.drop_table(aside)
    for index, column in INDEXES:
        op.create_index(index, "job_run", [column], unique=False)


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        rebuild_on_sqlite(new_columns=True)
        return
    op.add_column("job_run", sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("job_run", sa.Column("removed", sa.Integer(), nullable=True))
    op.add_column(
        "job_run", sa.Column("result", sa.String(length=1000), nullable=False, server_default="")
    )
    op.alter_column("job_run", "result", server_default=None)


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        rebuild_on_sqlite(new_columns=False)
        return
    op.drop_column("job_run", "result")
    op.drop_column("job_run", "removed")
    op.drop_column("job_run", "finished_at")
