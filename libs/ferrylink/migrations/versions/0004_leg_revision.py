"""A revision number on each transfer leg (`transfer.revision`) and on the sentinel link's
current state of a leg (`sentinel_leg.revision`): one more at each state change, so the
sentinel link orders a leg's states however they arrive, and a resubmitted leg that
reaches a state again is a new state, not a repeat.

Existing rows get 0 ("before revisions"); their next change is revision 1. Both databases
add (and drop) the column in place.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = ("transfer", "sentinel_leg")


def upgrade() -> None:
    for table in TABLES:
        op.add_column(
            table, sa.Column("revision", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    # SQLite (3.35+) drops a column in place, leaving each table as 0003 made it; a batch
    # rebuild would write the tables anew.
    for table in TABLES:
        op.execute(f"ALTER TABLE {table} DROP COLUMN revision")
