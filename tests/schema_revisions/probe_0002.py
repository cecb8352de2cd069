"""Test only (never shipped): a second revision after the baseline, so the tests can take a
database from an older known revision to the head. ferrylink.schema sees it only when a test
adds this folder to EXTRA_VERSION_LOCATIONS.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "schema_probe",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("note", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("account") as batch:
        batch.add_column(sa.Column("probe", sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("account") as batch:
        batch.drop_column("probe")
    op.drop_table("schema_probe")
