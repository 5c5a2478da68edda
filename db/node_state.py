"""Counts that tell how the node is doing: the admin page and ``/metrics`` read them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, case, delete, func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import (
    Instance,
    InstanceStatus,
    Result,
    SendStatus,
    SRDocument,
    StoreRefusal,
    StoreRefusalTotal,
    Study,
)
from db.repository import REFUSED_PREFIX, utcnow


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


def record_refusal(
    session: Session,
    status: int,
    reason: str | None,
    *,
    sop_instance_uid: str | None = None,
    calling_ae_title: str | None = None,
) -> None:
    """Append one refused C-STORE (its failure status, PS3.4 Table B.2-1). Does not commit."""
    session.add(
        StoreRefusal(
            at=utcnow(),
            status=status,
            reason=None if reason is None else reason[:200],
            sop_instance_uid=sop_instance_uid,
            calling_ae_title=calling_ae_title,
        )
    )


def status_label(status: int) -> str:
    """A DIMSE status as Prometheus label and PS3.4 write it: ``0xA900``."""
    return f"0x{status:04X}"


def refusals_by_status(session: Session) -> dict[str, int]:
    """Refused C-STOREs so far by status (:func:`status_label`): the rows kept plus those
    pruned (:class:`StoreRefusalTotal`), so a count never decreases when rows are pruned."""
    counts: Counter[int] = Counter()
    kept = select(StoreRefusal.status, func.count()).group_by(StoreRefusal.status)
    for status, n in session.execute(kept).tuples():
        counts[int(status)] += int(n)
    for status, n in session.execute(
        select(StoreRefusalTotal.status, StoreRefusalTotal.pruned)
    ).tuples():
        counts[int(status)] += int(n)
    return {status_label(status): n for status, n in sorted(counts.items())}


def refusals_before(session: Session, before: datetime) -> int:
    """Refusal rows older than ``before`` (what :func:`prune_refusals` would delete)."""
    query = select(func.count()).select_from(StoreRefusal).where(StoreRefusal.at < before)
    return int(session.scalar(query) or 0)


def prune_refusals(session: Session, before: datetime, limit: int) -> int:
    """Delete up to ``limit`` refusal rows older than ``before``, oldest first, adding each to
    its status' pruned total in the same transaction (so ``/metrics`` counts it still);
    return how many. Does not commit.

    The totals are incremented by what the DELETE returns: two prunes at once (the sweeper
    and ``fracture-triage purge``) each count only the rows they deleted, never one twice.
    """
    oldest = (
        select(StoreRefusal.id)
        .where(StoreRefusal.at < before)
        .order_by(StoreRefusal.id)
        .limit(limit)
        .scalar_subquery()
    )
    deleted = session.scalars(
        delete(StoreRefusal)
        .where(StoreRefusal.id.in_(oldest))
        .returning(StoreRefusal.status)
        .execution_options(synchronize_session=False)
    ).all()
    for status, n in Counter(int(s) for s in deleted).items():
        _add_pruned(session, status, n)
    return len(deleted)


def _add_pruned(session: Session, status: int, n: int) -> None:
    """``pruned += n`` for ``status``, creating its row: one atomic upsert (both dialects
    spell it ``INSERT ... ON CONFLICT (status) DO UPDATE``)."""
    values = {"status": status, "pruned": n}
    update_ = {"pruned": StoreRefusalTotal.pruned + n}
    if session.get_bind().dialect.name == "postgresql":
        pg = postgresql.insert(StoreRefusalTotal).values(values)
        session.execute(pg.on_conflict_do_update(index_elements=["status"], set_=update_))
    else:
        lite = sqlite.insert(StoreRefusalTotal).values(values)
        session.execute(lite.on_conflict_do_update(index_elements=["status"], set_=update_))


def _not_refused() -> ColumnElement[bool]:
    return or_(
        Instance.failure_reason.is_(None), ~Instance.failure_reason.startswith(REFUSED_PREFIX)
    )


@dataclass(frozen=True)
class Totals:
    """Counter-like totals read from the tables (rows are appended, not deleted; retention
    keeps the rows of the files it deletes; pruned refusals are counted on in their
    totals, :func:`refusals_by_status`)."""

    #: Instances stored and recorded (an object refused by the SCP is not one of them)
    received: int
    #: Classifications stored (one per instance and model version)
    classified: int
    #: Received instances that could not be classified (decode, preprocessing, ...)
    failed: int
    #: SR documents built, sent to the destination, given up sending
    srs_built: int
    srs_sent: int
    srs_failed: int


def totals(session: Session) -> Totals:
    received, failed = session.execute(
        select(
            func.count(),
            func.coalesce(
                func.sum(case((Instance.status == InstanceStatus.failed, 1), else_=0)), 0
            ),
        ).where(_not_refused())
    ).one()
    classified = session.scalar(select(func.count()).select_from(Result)) or 0
    reports = sr_counts(session)
    return Totals(
        received=int(received),
        classified=int(classified),
        failed=int(failed),
        srs_built=sum(reports.values()),
        srs_sent=reports[SendStatus.sent.value],
        srs_failed=reports[SendStatus.failed.value],
    )


#: Upper bounds (seconds) of the C-STORE handling time histogram: a C-STORE is tens of ms
#: (validation, a durable write, a commit); the guard's ACSE timeout is 30 s.
STORE_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: Upper bounds (seconds) of the time-to-result histogram: seconds on an idle node, minutes
#: behind a burst (the README's load figures).
RESULT_SECONDS_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0)


@dataclass(frozen=True)
class Histogram:
    """A histogram of observations computed in SQL: cumulative counts per upper bound
    (``buckets``, the last ``+Inf``), the number of observations and their sum."""

    buckets: list[tuple[float, int]]
    count: int
    total: float


def _histogram(session: Session, value: Any, bounds: tuple[float, ...], query: Any) -> Histogram:
    """One pass over ``query``'s rows: ``value`` counted under each bound (``<=``, as
    Prometheus' ``le``), with the count and sum."""
    columns = [func.coalesce(func.sum(case((value <= b, 1), else_=0)), 0) for b in bounds]
    row = session.execute(
        query.with_only_columns(*columns, func.count(value), func.coalesce(func.sum(value), 0.0))
    ).one()
    counts = [int(n) for n in row[: len(bounds)]]
    count, total = int(row[-2]), float(row[-1])
    return Histogram(
        buckets=[*zip(bounds, counts, strict=True), (float("inf"), count)],
        count=count,
        total=total,
    )


def store_seconds(session: Session) -> Histogram:
    """The SCP's handling time of each stored instance (``Instance.store_ms``), seconds."""
    value = Instance.store_ms / 1000.0
    return _histogram(
        session,
        value,
        STORE_SECONDS_BUCKETS,
        select(Instance.id).where(Instance.store_ms.is_not(None)),
    )


def seconds_between(session: Session, later: Any, earlier: Any) -> Any:
    """``later - earlier`` in seconds as an SQL expression of the session's dialect."""
    if session.get_bind().dialect.name == "postgresql":
        return func.extract("epoch", later - earlier)
    # SQLite keeps DateTime as ISO text; julianday() reads it (days, float)
    return (func.julianday(later) - func.julianday(earlier)) * 86400.0


def result_seconds(session: Session) -> Histogram:
    """Time to result of each classified instance: from received to its first result."""
    first = (
        select(Result.instance_id, func.min(Result.created_at).label("at"))
        .group_by(Result.instance_id)
        .subquery("first_result")
    )
    value = seconds_between(session, first.c.at, Instance.received_at)
    query = select(Instance.id).join(first, first.c.instance_id == Instance.id)
    return _histogram(session, value, RESULT_SECONDS_BUCKETS, query)
