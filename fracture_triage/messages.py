"""The typed contract between the SCP, the sweeper and the workers.

Queue messages carry ids, never pixel data or paths: the worker reads the path and
everything else from the database, which is the record. ``schema_version`` lets a worker
refuse a message it does not understand instead of misreading it. The queue and the task
names live here too, so that sender and worker cannot disagree on them.

Version 2 dropped ``path`` from ``ClassifyInstance`` and ``SendReport`` (no worker read it).
"""

from __future__ import annotations

from typing import ClassVar, Final, Literal

from pydantic import BaseModel, ConfigDict

SCHEMA_VERSION: Final = 2

#: The one queue the node uses (the SCP, the sweeper and the workers agree on it).
QUEUE: Final = "fracture_triage"


class QueueMessage(BaseModel):
    """A message of the current schema version, sent to the Celery task :attr:`task`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: The Celery task that consumes this message.
    task: ClassVar[str]

    # Literal of the number itself (a type cannot name a constant); must equal SCHEMA_VERSION.
    schema_version: Literal[2] = SCHEMA_VERSION


class ClassifyInstance(QueueMessage):
    """Classify one stored instance."""

    task: ClassVar[str] = "worker.classify_instance"

    instance_id: int
    sop_instance_uid: str


class ReportStudy(QueueMessage):
    """Build (or rebuild) the Structured Report of one study."""

    task: ClassVar[str] = "worker.report_study"

    study_id: int
    study_instance_uid: str


class SendReport(QueueMessage):
    """Send one produced SR to its destinations (before revision 0009; still read, for the
    messages a broker held across the upgrade)."""

    task: ClassVar[str] = "worker.send_report"

    sr_document_id: int


class Deliver(QueueMessage):
    """Make one attempt of one SR's delivery to one destination (``deliveries`` row)."""

    task: ClassVar[str] = "worker.deliver"

    delivery_id: int
