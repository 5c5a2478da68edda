"""The web application: users, API tokens, browser sessions, radiologists' verdicts, the audit
trail, the worklist's per-study summary (filled from the studies already stored) and the
indexes the worklist's filters use.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 05:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("disabled_at", _TZ, nullable=True),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("revoked_at", _TZ, nullable=True),
        sa.Column("last_used_at", _TZ, nullable=True),
    )
    op.create_table(
        "web_sessions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("session_sha256", sa.String(64), nullable=False, unique=True),
        sa.Column("user_id", sa.Integer(), sa.ForeignKey("users.id"), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
        sa.Column("expires_at", _TZ, nullable=False),
    )
    op.create_index("ix_web_sessions_user_id", "web_sessions", ["user_id"])
    op.create_table(
        "radiologist_verdicts",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), nullable=False),
        sa.Column("fracture", sa.Boolean(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("read", sa.Boolean(), nullable=False),
        sa.Column("author", sa.String(64), nullable=False),
        sa.Column("author_kind", sa.String(8), nullable=False),
        sa.Column("created_at", _TZ, nullable=False),
    )
    op.create_index("ix_radiologist_verdicts_study_id", "radiologist_verdicts", ["study_id"])
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("at", _TZ, nullable=False),
        sa.Column("actor", sa.String(80), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("study_instance_uid", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
        sa.Column("client_address", sa.String(64), nullable=True),
    )
    for column in ("at", "actor", "action", "study_instance_uid"):
        op.create_index(f"ix_audit_events_{column}", "audit_events", [column])
    op.create_index("ix_studies_last_received_at", "studies", ["last_received_at"])
    op.create_index("ix_studies_study_date", "studies", ["study_date"])
    op.create_index("ix_series_modality", "series", ["modality"])
    op.create_index("ix_series_body_part_examined", "series", ["body_part_examined"])
    op.create_index("ix_instances_series_status", "instances", ["series_id", "status"])
    op.create_table(
        "study_triage",
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("studies.id"), primary_key=True),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("max_probability", sa.Float(), nullable=True),
        sa.Column("last_received_at", _TZ, nullable=False),
        sa.Column("instances", sa.Integer(), nullable=False),
        sa.Column("classified", sa.Integer(), nullable=False),
        sa.Column("failed", sa.Integer(), nullable=False),
        sa.Column("first_received_at", _TZ, nullable=True),
        sa.Column("last_result_at", _TZ, nullable=True),
        sa.Column("modality", sa.String(16), nullable=True),
        sa.Column("body_part_examined", sa.String(64), nullable=True),
    )
    op.create_index(
        "ix_study_triage_order",
        "study_triage",
        ["priority", "max_probability", "last_received_at", "study_id"],
    )
    # The summary of what is stored already, as db.triage computes it at this revision (the
    # priority is the study decision from results.decision, 0004: fracture 3, doubt 2, no
    # fracture 1, unclassified 0), written out here: a migration must not change when the
    # application code does.
    op.execute(_BACKFILL)


_DONE_PROBABILITY = "CASE WHEN i.status = 'done' THEN r.probability END"
_BACKFILL = f"""
INSERT INTO study_triage (study_id, priority, max_probability, last_received_at, instances,
    classified, failed, first_received_at, last_result_at, modality, body_part_examined)
SELECT se.study_id,
    COALESCE(MAX(CASE WHEN i.status = 'done' AND r.id IS NOT NULL
                      THEN CASE r.decision WHEN 'fracture' THEN 3 WHEN 'doubt' THEN 2
                                           WHEN 'no fracture' THEN 1 END END), 0),
    MAX({_DONE_PROBABILITY}),
    MAX(st.last_received_at),
    COUNT(i.id),
    SUM(CASE WHEN i.status = 'done' THEN 1 ELSE 0 END),
    SUM(CASE WHEN i.status = 'failed' THEN 1 ELSE 0 END),
    MIN(i.received_at),
    MAX(CASE WHEN i.status = 'done' THEN r.created_at END),
    MAX(se.modality),
    MAX(se.body_part_examined)
FROM instances i
JOIN series se ON i.series_id = se.id
JOIN studies st ON st.id = se.study_id
LEFT JOIN (SELECT instance_id, MAX(id) AS result_id FROM results GROUP BY instance_id) lr
    ON lr.instance_id = i.id
LEFT JOIN results r ON r.id = lr.result_id
GROUP BY se.study_id
"""


def downgrade() -> None:
    op.drop_index("ix_study_triage_order", "study_triage")
    op.drop_table("study_triage")
    op.drop_index("ix_instances_series_status", "instances")
    op.drop_index("ix_series_body_part_examined", "series")
    op.drop_index("ix_series_modality", "series")
    op.drop_index("ix_studies_study_date", "studies")
    op.drop_index("ix_studies_last_received_at", "studies")
    for table in ("audit_events", "radiologist_verdicts", "web_sessions", "api_tokens", "users"):
        op.drop_table(table)
