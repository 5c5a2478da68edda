"""instances: the SCP's handling time of each stored object (``store_ms``); store_refusals:
every C-STORE answered with a failure status. Both for ``/metrics``. And the series indexes of
the worklist's modality and body part filters carry the study id (index-only EXISTS).

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02 18:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | Sequence[str] | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("store_ms", sa.Float(), nullable=True))
    op.create_table(
        "store_refusals",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("sop_instance_uid", sa.String(64), nullable=True),
        sa.Column("calling_ae_title", sa.String(16), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_store_refusals_status", "store_refusals", ["status"])
    op.drop_index("ix_series_modality", "series")
    op.drop_index("ix_series_body_part_examined", "series")
    op.create_index("ix_series_modality_study", "series", ["modality", "study_id"])
    op.create_index("ix_series_body_part_study", "series", ["body_part_examined", "study_id"])


def downgrade() -> None:
    op.drop_index("ix_series_body_part_study", "series")
    op.drop_index("ix_series_modality_study", "series")
    op.create_index("ix_series_modality", "series", ["modality"])
    op.create_index("ix_series_body_part_examined", "series", ["body_part_examined"])
    op.drop_index("ix_store_refusals_status", table_name="store_refusals")
    op.drop_table("store_refusals")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("store_ms")
