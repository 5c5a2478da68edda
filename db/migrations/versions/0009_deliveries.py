"""deliveries: one row per (produced SR, destination), with its own retries and backoff.

The SRs recorded before this revision went to the one ``sr_destination_*`` destination:
each gets a delivery of that name (``settings.LEGACY_DESTINATION``) in the state its
``send_status`` says (failed: gave up), so their history stays visible and ``resend`` can
put them back.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02 17:40:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | Sequence[str] | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sr_documents") as batch:
        batch.add_column(sa.Column("decision", sa.String(16), nullable=True))
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("sr_document_id", sa.Integer(), sa.ForeignKey("sr_documents.id"), nullable=False),
        sa.Column("destination", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pending_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("message_control_id", sa.String(20), nullable=True),
        sa.UniqueConstraint("sr_document_id", "destination", name="uq_delivery_destination"),
    )
    op.create_index("ix_deliveries_sr_document_id", "deliveries", ["sr_document_id"])
    op.create_index("ix_deliveries_state_due", "deliveries", ["state", "next_attempt_at"])
    sr = sa.table(
        "sr_documents",
        sa.column("id", sa.Integer),
        sa.column("send_status", sa.String),
        sa.column("send_attempts", sa.Integer),
        sa.column("send_error", sa.Text),
        sa.column("sent_at", sa.DateTime(timezone=True)),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )
    deliveries = sa.table(
        "deliveries",
        *(
            sa.column(name)
            for name in (
                "sr_document_id",
                "destination",
                "kind",
                "state",
                "attempts",
                "last_error",
                "created_at",
                "pending_since",
                "next_attempt_at",
                "sent_at",
            )
        ),
    )
    states = {"pending": "pending", "sent": "sent", "failed": "gave up"}
    now = datetime.now(UTC)
    conn = op.get_bind()
    rows = conn.execute(sa.select(sr).where(sr.c.send_status.in_(list(states)))).mappings()
    values = [
        {
            "sr_document_id": r["id"],
            "destination": "sr_destination",
            "kind": "dicom",
            "state": states[r["send_status"]],
            "attempts": r["send_attempts"] or 0,
            "last_error": r["send_error"],
            "created_at": r["created_at"],
            "pending_since": now,
            "next_attempt_at": now if r["send_status"] == "pending" else None,
            "sent_at": r["sent_at"],
        }
        for r in rows
    ]
    if values:
        op.bulk_insert(deliveries, values)


def downgrade() -> None:
    op.drop_index("ix_deliveries_state_due", table_name="deliveries")
    op.drop_index("ix_deliveries_sr_document_id", table_name="deliveries")
    op.drop_table("deliveries")
    with op.batch_alter_table("sr_documents") as batch:
        batch.drop_column("decision")
