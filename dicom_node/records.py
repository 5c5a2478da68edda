"""Database records the SCP needs beyond ``db.repository`` (candidates to move there).

A refused object whose UIDs are usable is recorded as an instance with status ``failed`` and
a ``failure_reason`` starting with :data:`REFUSED_PREFIX`, so the administrator sees it in
the results and the study's SR lists it as failed. Such a record must not block a corrected
object sent later under the same SOP Instance UID: :func:`reopen_refused` turns it into a
normal pending instance.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Instance, InstanceStatus
from db.repository import ReceivedInstance, utcnow

#: Start of ``failure_reason`` for objects the SCP refused with a failure status.
REFUSED_PREFIX = "refused by the storage SCP"


def find_instance(session: Session, sop_instance_uid: str) -> Instance | None:
    return session.scalars(
        select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
    ).first()


def is_refused(instance: Instance) -> bool:
    """Whether the record is of an object the SCP refused (not of an acknowledged one)."""
    return instance.status == InstanceStatus.failed and (instance.failure_reason or "").startswith(
        REFUSED_PREFIX
    )


def reopen_refused(session: Session, instance: Instance, rec: ReceivedInstance) -> Instance:
    """Replace the record of a refused object by the valid object just stored (``pending``).

    The series (and so the study) is the new object's; the study is marked changed so that
    its report is rebuilt.
    """
    from db.repository import _get_or_create_series, _get_or_create_study

    now = utcnow()
    study = _get_or_create_study(session, rec, now)
    series = _get_or_create_series(session, rec, study)
    instance.series = series
    instance.sop_class_uid = rec.sop_class_uid
    instance.transfer_syntax_uid = rec.transfer_syntax_uid
    instance.instance_number = rec.instance_number
    instance.received_at = now
    instance.calling_ae_title = rec.calling_ae_title
    instance.storage_path = rec.storage_path
    instance.failure_reason = rec.failure_reason
    instance.status = InstanceStatus.failed if rec.failure_reason else InstanceStatus.pending
    instance.queued_at = None
    instance.attempts = 0
    study.last_received_at = now
    study.revision = (study.revision or 0) + 1
    session.commit()
    return instance
