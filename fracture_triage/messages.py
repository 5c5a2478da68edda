"""The typed contract between the SCP, the sweeper and the workers.

Queue messages carry ids and paths, never pixel data. ``schema_version`` lets a worker refuse
a message it does not understand instead of misreading it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION = 1


class ClassifyInstance(BaseModel):
    """Classify one stored instance (Celery task ``worker.classify_instance``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1  # SCHEMA_VERSION
    instance_id: int
    sop_instance_uid: str
    path: str


class ReportStudy(BaseModel):
    """Build (or rebuild) the Structured Report of one study (``worker.report_study``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1  # SCHEMA_VERSION
    study_id: int
    study_instance_uid: str


class SendReport(BaseModel):
    """Send one produced SR to the configured destination (``worker.send_report``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    schema_version: Literal[1] = 1  # SCHEMA_VERSION
    sr_document_id: int
    path: str
