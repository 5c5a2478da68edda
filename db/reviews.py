"""One study as the radiologist reads it, and the verdicts radiologists give on it.

A verdict is appended, never changed: the rows of a study are its verdict history, the newest
one is its current reading. Functions take an open ``Session`` and never commit.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.deliveries import delivery_dict
from db.models import (
    Evidence,
    Instance,
    InstanceStatus,
    RadiologistVerdict,
    Result,
    Series,
    SRDocument,
    Study,
)
from db.repository import as_utc, utcnow
from db.triage import latest_results
from db.worklist import verdict_dict
from fracture_triage.attributes import PATIENT_IDENTIFIERS, STUDY_FIELDS
from fracture_triage.verdict import study_verdict

#: Longest comment kept with a verdict.
MAX_COMMENT = 2000


def find_study(session: Session, study_instance_uid: str) -> Study | None:
    return session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))


def find_instance(session: Session, study: Study, sop_instance_uid: str) -> Instance | None:
    """The instance with this SOP Instance UID, if it belongs to ``study``."""
    return session.scalar(
        select(Instance)
        .join(Series, Instance.series_id == Series.id)
        .where(Instance.sop_instance_uid == sop_instance_uid, Series.study_id == study.id)
    )


def record_verdict(
    session: Session,
    study: Study,
    *,
    fracture: bool | None,
    comment: str | None,
    read: bool,
    author: str,
    author_kind: str,
) -> RadiologistVerdict:
    if comment is not None and len(comment) > MAX_COMMENT:
        raise ValueError(f"comment longer than {MAX_COMMENT} characters")
    verdict = RadiologistVerdict(
        study_id=study.id,
        fracture=fracture,
        comment=comment or None,
        read=read,
        author=author,
        author_kind=author_kind,
        created_at=utcnow(),
    )
    session.add(verdict)
    session.flush()
    return verdict


def verdict_history(session: Session, study: Study) -> list[RadiologistVerdict]:
    """Newest first."""
    return list(
        session.scalars(
            select(RadiologistVerdict)
            .where(RadiologistVerdict.study_id == study.id)
            .order_by(RadiologistVerdict.id.desc())
        )
    )


def study_detail(session: Session, study: Study, *, include_patient: bool) -> dict[str, Any]:
    """The study, its images (probability, decision, failure reason, evidence Secondary
    Capture), its SRs and verdicts. The study's ``decision`` is ``verdict.study_verdict``'s,
    the rule ``db.triage`` ranks the worklist by."""
    latest = latest_results()
    rows = session.execute(
        select(Instance, Series, Result, Evidence)
        .join(Series, Instance.series_id == Series.id)
        .outerjoin(latest, latest.c.instance_id == Instance.id)
        .outerjoin(Result, Result.id == latest.c.result_id)
        .outerjoin(Evidence, Evidence.result_id == Result.id)
        .where(Series.study_id == study.id)
        .order_by(Series.id, Instance.id)
    ).tuples()
    images: list[dict[str, Any]] = []
    scores: list[tuple[float | None, bool | None, str | None]] = []
    for instance, series, result, evidence in rows:
        counted = result is not None and instance.status.value == "done"
        if counted and result is not None:
            scores.append((result.probability, result.fracture, result.decision.value))
        images.append(
            {
                "sop_instance_uid": instance.sop_instance_uid,
                "series_instance_uid": series.series_instance_uid,
                "sop_class_uid": instance.sop_class_uid,
                "instance_number": instance.instance_number,
                "modality": series.modality,
                "body_part_examined": series.body_part_examined,
                "received_at": as_utc(instance.received_at).isoformat(),
                "status": instance.status.value,
                "failure_reason": instance.failure_reason,
                "probability": None if result is None else round(float(result.probability), 6),
                "fracture": None if result is None else bool(result.fracture),
                "decision": None if result is None else result.decision.value,
                "threshold": None if result is None else float(result.threshold),
                "upper_threshold": None if result is None else float(result.upper_threshold),
                "model": None if result is None else f"{result.model_name} {result.model_version}",
                # The result's evidence Secondary Capture (heat map): produced at its path,
                # or why not; None while there is no result (or it predates evidence).
                "evidence": None if evidence is None else evidence_dict(evidence),
            }
        )
    verdict = study_verdict(scores)
    reports = session.scalars(
        select(SRDocument).where(SRDocument.study_id == study.id).order_by(SRDocument.id.desc())
    )
    detail: dict[str, Any] = {
        "study_instance_uid": study.study_instance_uid,
        **{k: getattr(study, k) for k in STUDY_FIELDS if k not in PATIENT_IDENTIFIERS},
        "last_received_at": as_utc(study.last_received_at).isoformat(),
        "fracture": verdict.fracture if verdict.assessed else None,
        "decision": None if verdict.decision is None else verdict.decision.value,
        "max_probability": verdict.probability,
        # every image not assessed: its body part is outside the model's scope
        "out_of_scope": bool(images)
        and all(i["status"] == InstanceStatus.out_of_scope.value for i in images),
        "report_failure": study.report_failure,
        "images": images,
        "reports": [
            {
                "sop_instance_uid": d.sop_instance_uid,
                "created_at": as_utc(d.created_at).isoformat(),
                "fracture": d.fracture,
                "probability": d.probability,
                "instance_count": d.instance_count,
                "superseded": d.superseded_by_id is not None,
                "send_status": d.send_status.value,
                "send_error": d.send_error,
                # one per destination: pending (retrying), sent or gave up
                "deliveries": [delivery_dict(x) for x in d.deliveries],
            }
            for d in reports
        ],
        "verdicts": [verdict_dict(v) for v in verdict_history(session, study)],
    }
    if include_patient:
        for name in PATIENT_IDENTIFIERS:
            detail[name] = getattr(study, name)
    return detail


def evidence_dict(evidence: Evidence) -> dict[str, Any]:
    """The evidence Secondary Capture of one result as the study page and API show it."""
    return {
        "state": evidence.state.value,
        "path": evidence.path,
        "reason": evidence.reason,
        "sop_instance_uid": evidence.sop_instance_uid,
        "send_status": evidence.send_status.value,
    }
