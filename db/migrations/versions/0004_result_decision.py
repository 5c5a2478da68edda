"""results: the decision level (fracture / doubt / no fracture) and the upper threshold.

Results stored before this revision were decided with one threshold: they get
upper_threshold = threshold and the decision that gives (probability >= threshold:
fracture, else no fracture), the rule of ``fracture_triage.verdict.decide``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DECISION = sa.Enum(
    "fracture", "doubt", "no fracture", name="decision", native_enum=False, length=16
)


def upgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("upper_threshold", sa.Float(), nullable=True))
        batch.add_column(sa.Column("decision", _DECISION, nullable=True))
    op.execute(
        "UPDATE results SET upper_threshold = threshold, decision = CASE "
        "WHEN probability >= threshold THEN 'fracture' ELSE 'no fracture' END"
    )
    with op.batch_alter_table("results") as batch:
        batch.alter_column("upper_threshold", existing_type=sa.Float(), nullable=False)
        batch.alter_column("decision", existing_type=_DECISION, nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("results") as batch:
        batch.drop_column("decision")
        batch.drop_column("upper_threshold")
