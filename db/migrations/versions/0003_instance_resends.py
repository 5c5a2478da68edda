"""instances: digest of the stored content and conflicting re-sends of the SOP Instance UID.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 01:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("content_sha256", sa.String(64), nullable=True))
        batch.add_column(
            sa.Column("conflicting_resends", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(sa.Column("last_conflict_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("last_conflict_sha256", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("last_conflict_sha256")
        batch.drop_column("last_conflict_at")
        batch.drop_column("conflicting_resends")
        batch.drop_column("content_sha256")
