"""The database operations the roles share. Each takes an open ``Session`` and never commits:
the caller (an SCP request, a Celery task, a sweep, a CLI command) is one unit of work and
commits once (:func:`db.session.in_transaction` does it, retrying a lost insert race).

Every write is idempotent: a SOP Instance is recorded once, and a result is stored once per
(instance, model version), whatever retries or duplicate deliveries happen.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db import identity, triage
from db.models import Instance, InstanceStatus, Result, Series, SRDocument, Study
from fracture_triage.attributes import STUDY_FIELDS
from fracture_triage.verdict import Decision, decide


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """The same instant as an aware datetime in UTC, what every output (results, the API,
    the pages, which print the first 19 characters under "UTC") shows. SQLite returns naive
    datetimes, stored as UTC; PostgreSQL returns ``timestamptz`` in the server's (session's)
    ``TimeZone``, which on a hospital's server is local time, not UTC."""
    return value.astimezone(UTC) if value.tzinfo else value.replace(tzinfo=UTC)


@dataclass(frozen=True)
class ReceivedInstance:
    """What the SCP knows about an object it has just written to storage."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    storage_path: str
    calling_ae_title: str | None = None
    transfer_syntax_uid: str | None = None
    instance_number: str | None = None
    modality: str | None = None
    body_part_examined: str | None = None
    series_number: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    accession_number: str | None = None
    study_id: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    referring_physician_name: str | None = None
    #: Set when the SCP already knows the object cannot be classified.
    failure_reason: str | None = None
    #: SHA-256 (hex) of the data set as received (``Instance.content_sha256``).
    content_sha256: str | None = None


def _get_or_create_study(session: Session, rec: ReceivedInstance, now: datetime) -> Study:
    """The object's study; a stored one must not be another patient's (:mod:`db.identity`)."""
    study = session.scalars(
        select(Study).where(Study.study_instance_uid == rec.study_instance_uid)
    ).first()
    if study is None:
        # A study inserted by another association meanwhile makes the flush fail
        # (uq studies.study_instance_uid): the unit of work runs again and lands below.
        study = Study(study_instance_uid=rec.study_instance_uid, last_received_at=now, revision=0)
        study.patient_id = identity.normalized_patient_id(rec.patient_id)
        session.add(study)
    else:
        identity.claim_patient(session, study, rec.patient_id)
    for name in STUDY_FIELDS:
        value = getattr(rec, name)
        if name != "patient_id" and value and not getattr(study, name):
            setattr(study, name, value)
    return study


def _get_or_create_series(session: Session, rec: ReceivedInstance, study: Study) -> Series:
    """The object's series; a stored one must be in the object's study (:mod:`db.identity`)."""
    series = session.scalars(
        select(Series).where(Series.series_instance_uid == rec.series_instance_uid)
    ).first()
    if series is None:
        # Inserted by another association meanwhile: the flush fails (unique series UID), the
        # unit of work runs again and the check below then sees the stored series.
        series = Series(
            series_instance_uid=rec.series_instance_uid,
            study=study,
            modality=rec.modality,
            body_part_examined=rec.body_part_examined,
            series_number=rec.series_number,
        )
        session.add(series)
    else:
        identity.series_conflict(
            rec.series_instance_uid, series.study.study_instance_uid, rec.study_instance_uid
        )
    return series


#: Start of ``failure_reason`` for objects the storage SCP refused with a failure status.
#: Such an object, when its UIDs are usable, is recorded as a ``failed`` instance so that the
#: administrator sees it in the results and the study's SR lists it; a corrected object sent
#: later under the same SOP Instance UID replaces it (:func:`reopen_refused`).
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


def _take_received(session: Session, instance: Instance, rec: ReceivedInstance) -> None:
    """Fill ``instance`` from the object just stored and mark its study changed (new revision,
    so that its report is rebuilt): ``pending``, or ``failed`` when the SCP knows why."""
    now = utcnow()
    study = _get_or_create_study(session, rec, now)
    instance.series = _get_or_create_series(session, rec, study)
    instance.sop_class_uid = rec.sop_class_uid
    instance.transfer_syntax_uid = rec.transfer_syntax_uid
    instance.instance_number = rec.instance_number
    instance.received_at = now
    instance.calling_ae_title = rec.calling_ae_title
    instance.storage_path = rec.storage_path
    failed = rec.failure_reason is not None
    instance.status = InstanceStatus.failed if failed else InstanceStatus.pending
    instance.failure_reason = rec.failure_reason
    instance.queued_at = None
    instance.attempts = 0
    instance.content_sha256 = rec.content_sha256
    study.last_received_at = now
    study.revision = (study.revision or 0) + 1


def record_received(session: Session, rec: ReceivedInstance) -> tuple[Instance, bool]:
    """Record a stored instance; return it and whether it is new.

    A SOP Instance UID seen before is not recorded again (the same object sent twice is
    stored once and classified once). When another association records the same study,
    series or instance at the same moment, the flush raises ``IntegrityError``: the caller
    rolls back and runs its unit of work again (:func:`db.session.in_transaction`), which then
    finds the row.

    Raises :class:`db.identity.IdentityConflict` when the object's series is stored under
    another study, or its study with another Patient ID: nothing of it may be recorded, the
    caller rolls back.
    """
    existing = find_instance(session, rec.sop_instance_uid)
    if existing is not None:
        return existing, False
    instance = Instance(sop_instance_uid=rec.sop_instance_uid)
    _take_received(session, instance, rec)
    session.add(instance)
    session.flush()
    refresh_triage(session, instance.series.study_id)
    return instance, True


def refresh_triage(session: Session, *study_ids: int | None) -> None:
    """Bring the worklist summary of these studies up to date (``db.triage``), in the
    writer's transaction: every write below that changes a study's images calls it."""
    session.flush()
    for study_id in dict.fromkeys(study_ids):
        if study_id is not None:
            triage.refresh_study(session, study_id)


def reopen_refused(session: Session, instance: Instance, rec: ReceivedInstance) -> Instance:
    """Replace the record of a refused object by the valid object just stored (``pending``).

    The series (and so the study) is the new object's; the study is marked changed so that
    its report is rebuilt. Raises :class:`db.identity.IdentityConflict` as
    :func:`record_received` does.
    """
    before = instance.series.study_id if instance.series is not None else None
    _take_received(session, instance, rec)
    session.flush()
    refresh_triage(session, before, instance.series.study_id)
    return instance


def note_conflicting_resend(session: Session, instance: Instance, content_sha256: str) -> None:
    """Count a re-send of ``instance``'s SOP Instance UID whose content differs from the
    stored object's, with its time and digest (the object itself is not kept)."""
    instance.conflicting_resends = (instance.conflicting_resends or 0) + 1
    instance.last_conflict_at = utcnow()
    instance.last_conflict_sha256 = content_sha256


def replace_conflicting(session: Session, instance: Instance, rec: ReceivedInstance) -> Instance:
    """Take the newer object of a conflicting re-send (``keep-newest``): the record is the new
    object's, ``pending`` again (or ``failed`` when the SCP knows why), its results are
    deleted so that it is classified again, and the study it was in before (when it moved)
    is marked changed too, so that both reports are rebuilt. The conflict is counted."""
    before = instance.series.study if instance.series is not None else None
    for result in list(instance.results):
        session.delete(result)
    note_conflicting_resend(session, instance, rec.content_sha256 or "")
    _take_received(session, instance, rec)
    if before is not None and before.study_instance_uid != rec.study_instance_uid:
        before.revision = (before.revision or 0) + 1
    session.flush()
    refresh_triage(session, before.id if before else None, instance.series.study_id)
    return instance


def mark_queued(session: Session, instance_id: int, store_ms: float | None = None) -> None:
    """The instance's classify message is on the broker; ``store_ms`` (the SCP's, once it
    has queued what it stored) replaces the handling time recorded with the instance."""
    instance = session.get(Instance, instance_id)
    if instance is None:
        return
    if store_ms is not None:
        instance.store_ms = store_ms
    if instance.status == InstanceStatus.pending:
        instance.status = InstanceStatus.queued
        instance.queued_at = utcnow()


def mark_failed(session: Session, instance_id: int, reason: str) -> None:
    """Record a permanent failure (decode, preprocessing): it is not retried."""
    instance = session.get(Instance, instance_id)
    if instance is None:
        return
    instance.status = InstanceStatus.failed
    instance.failure_reason = reason[:2000]
    _end_attempt(instance)
    refresh_triage(session, instance.series.study_id)


def mark_out_of_scope(session: Session, instance_id: int, reason: str) -> None:
    """Record that an instance is not assessed: its body part is outside the model's scope
    (``fracture_triage.scope``). Like a failure it is settled and never classified; unlike
    one, nothing went wrong."""
    instance = session.get(Instance, instance_id)
    if instance is None:
        return
    instance.status = InstanceStatus.out_of_scope
    instance.failure_reason = reason[:2000]
    _end_attempt(instance)
    refresh_triage(session, instance.series.study_id)


def _end_attempt(instance: Instance) -> None:
    instance.attempt_owner = None
    instance.attempt_started_at = None


def pending_instances(
    session: Session, limit: int = 500, received_before: timedelta | None = None
) -> Sequence[Instance]:
    """Instances stored but not yet on the queue, oldest first; with ``received_before``
    only those received at least that long ago."""
    query = select(Instance).where(Instance.status == InstanceStatus.pending)
    if received_before is not None:
        query = query.where(Instance.received_at <= utcnow() - received_before)
    return session.scalars(query.order_by(Instance.id).limit(limit)).all()


def stale_queued_instances(
    session: Session, older_than: timedelta, limit: int = 500
) -> Sequence[Instance]:
    """Queued instances with no result for a long time (a message lost with a flushed broker)."""
    cutoff = utcnow() - older_than
    return session.scalars(
        select(Instance)
        .where(Instance.status == InstanceStatus.queued, Instance.queued_at < cutoff)
        .order_by(Instance.id)
        .limit(limit)
    ).all()


@dataclass(frozen=True)
class Classification:
    """One image's classification; ``threshold`` is the card's lower threshold and
    ``fracture`` the flag ``probability >= threshold``; ``upper_threshold`` None: the card has
    one threshold (upper == lower)."""

    probability: float
    threshold: float
    fracture: bool
    model_name: str
    model_version: str
    model_uid: str
    preprocess_ms: float
    inference_ms: float
    upper_threshold: float | None = None

    @property
    def upper(self) -> float:
        return self.threshold if self.upper_threshold is None else self.upper_threshold

    @property
    def decision(self) -> Decision:
        return decide(self.probability, self.threshold, self.upper)


def find_result(session: Session, instance_id: int, model_version: str) -> Result | None:
    return session.scalars(
        select(Result).where(
            Result.instance_id == instance_id, Result.model_version == model_version
        )
    ).first()


def save_result(session: Session, instance_id: int, c: Classification) -> Result:
    """Store the result of one instance for one model version, once; mark the instance done.

    A redelivered task storing the same result at the same moment makes the flush raise
    ``IntegrityError`` (uq_result_model): run again, this finds the one result stored.
    """
    existing = find_result(session, instance_id, c.model_version)
    if existing is None:
        existing = Result(
            instance_id=instance_id,
            model_name=c.model_name,
            model_version=c.model_version,
            model_uid=c.model_uid,
            probability=float(c.probability),
            threshold=float(c.threshold),
            fracture=bool(c.fracture),
            upper_threshold=float(c.upper),
            decision=c.decision,
            preprocess_ms=c.preprocess_ms,
            inference_ms=c.inference_ms,
            created_at=utcnow(),
        )
        session.add(existing)
        session.flush()
    instance = session.get(Instance, instance_id)
    if instance is not None:
        _end_attempt(instance)
        if instance.status != InstanceStatus.done:
            instance.status = InstanceStatus.done
            instance.failure_reason = None
        refresh_triage(session, instance.series.study_id)
    return existing


def result_to_report(session: Session, instance_id: int, model_version: str) -> Result | None:
    """The result of ``model_version``, else the newest of any version (a result from another
    model is still a result: it is reported under that model)."""
    result = find_result(session, instance_id, model_version)
    if result is None:
        result = session.scalars(
            select(Result).where(Result.instance_id == instance_id).order_by(Result.id.desc())
        ).first()
    return result


def studies_ready_to_report(session: Session, stable_seconds: float) -> Sequence[Study]:
    """Studies changed since their last report, quiet for ``stable_seconds``, all images settled."""
    cutoff = utcnow() - timedelta(seconds=stable_seconds)
    unsettled = (
        select(func.count(Instance.id))
        .join(Series, Instance.series_id == Series.id)
        .where(
            Series.study_id == Study.id,
            Instance.status.in_([InstanceStatus.pending, InstanceStatus.queued]),
        )
        .correlate(Study)
        .scalar_subquery()
    )
    return session.scalars(
        select(Study).where(
            (Study.reported_revision.is_(None)) | (Study.reported_revision != Study.revision),
            Study.last_received_at <= cutoff,
            unsettled == 0,
        )
    ).all()


def study_instances(session: Session, study_id: int) -> Sequence[Instance]:
    return session.scalars(
        select(Instance)
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
        .order_by(Series.id, Instance.id)
    ).all()


def latest_report(session: Session, study_id: int) -> SRDocument | None:
    return session.scalars(
        select(SRDocument)
        .where(SRDocument.study_id == study_id, SRDocument.superseded_by_id.is_(None))
        .order_by(SRDocument.id.desc())
    ).first()


# --- worker and sweeper (H-WORK) -------------------------------------------------------------


#: ``may_take(owner, started_at)``: whether the attempt ``owner`` started is certainly over.
AttemptOver = Callable[[str, datetime | None], bool]


def claim_attempt(
    session: Session, instance_id: int, owner: str, may_take: AttemptOver
) -> int | None:
    """Start one classification attempt as ``owner``; the attempt count, or ``None`` when
    another attempt is under way (``may_take`` says it is not over). The caller commits.

    Compare-and-set on the attempt count, so of two deliveries racing for one instance
    exactly one wins, on SQLite and PostgreSQL alike (a concurrent UPDATE re-checks its
    WHERE clause against the committed row). The attempt's claim is cleared when its result
    or failure is recorded (:func:`save_result`, :func:`mark_failed`).
    """
    instance = session.get(Instance, instance_id)
    if instance is None:
        return None
    before = instance.attempts or 0
    if instance.attempt_owner is not None and not may_take(
        instance.attempt_owner, instance.attempt_started_at
    ):
        return None
    taken = session.execute(
        update(Instance)
        .where(Instance.id == instance_id, Instance.attempts == before)
        .values(attempts=before + 1, attempt_owner=owner, attempt_started_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    if getattr(taken, "rowcount", 0) != 1:
        return None
    session.refresh(instance)
    return before + 1


def release_attempt(session: Session, instance_id: int, owner: str) -> None:
    """End ``owner``'s claim on the instance without a record (the attempt will be retried)."""
    session.execute(
        update(Instance)
        .where(Instance.id == instance_id, Instance.attempt_owner == owner)
        .values(attempt_owner=None, attempt_started_at=None)
        .execution_options(synchronize_session=False)
    )


def mark_requeued(session: Session, instance_id: int) -> None:
    """A ``queued`` instance whose message was sent again (the sweeper found it stale)."""
    instance = session.get(Instance, instance_id)
    if instance is not None and instance.status == InstanceStatus.queued:
        instance.queued_at = utcnow()
