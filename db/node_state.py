"""Counts that tell how the node is doing: the admin page and ``/metrics`` read them."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Instance, InstanceStatus, SendStatus, SRDocument, Study
from db.repository import REFUSED_PREFIX


def instance_counts(session: Session) -> dict[str, int]:
    """Instances by :class:`InstanceStatus` (every state present, zero when none)."""
    counts = {s.value: 0 for s in InstanceStatus}
    for status, n in session.execute(
        select(Instance.status, func.count()).group_by(Instance.status)
    ).tuples():
        counts[InstanceStatus(status).value] = int(n)
    return counts


def sr_counts(session: Session) -> dict[str, int]:
    """Produced SRs by :class:`SendStatus`."""
    counts = {s.value: 0 for s in SendStatus}
    for status, n in session.execute(
        select(SRDocument.send_status, func.count()).group_by(SRDocument.send_status)
    ).tuples():
        counts[SendStatus(status).value] = int(n)
    return counts


def study_count(session: Session) -> int:
    return int(session.scalar(select(func.count()).select_from(Study)) or 0)


def report_failures(session: Session) -> int:
    """Studies whose latest report could not be built."""
    return int(
        session.scalar(
            select(func.count()).select_from(Study).where(Study.report_failure.is_not(None))
        )
        or 0
    )


def refused_count(session: Session) -> int:
    """Objects the SCP refused (recorded as failed with the SCP's reason)."""
    return int(
        session.scalar(
            select(func.count())
            .select_from(Instance)
            .where(Instance.failure_reason.startswith(REFUSED_PREFIX))
        )
        or 0
    )
