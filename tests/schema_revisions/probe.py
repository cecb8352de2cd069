"""Test only (never shipped): a revision after the shipped head, so the tests can take a
database from an older known revision to the head. Not loaded from here: the
`with_test_revision` fixture copies it to a temporary folder with PROBE and SHIPPED_HEAD
replaced by the next revision id and the shipped head, and adds that folder to
ferrylink.schema's EXTRA_VERSION_LOCATIONS.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "PROBE"
down_revision: str | Sequence[str] | None = "SHIPPED_HEAD"
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
