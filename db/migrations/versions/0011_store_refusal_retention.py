"""store_refusals are pruned after ``refusal_retention_days``: an index on ``at`` for it, and
store_refusal_totals, per status the rows pruned so far, so that ``/metrics``' refusal counter
never decreases.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | Sequence[str] | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_store_refusals_at", "store_refusals", ["at"])
    op.create_table(
        "store_refusal_totals",
        sa.Column("status", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("pruned", sa.Integer(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("store_refusal_totals")
    op.drop_index("ix_store_refusals_at", table_name="store_refusals")
