"""Identity rules: a series belongs to one study, and a study to one patient.

A received object names its study (Study Instance UID), its series (Series Instance UID) and
its patient (Patient ID). An object that contradicts what is stored is refused, never merged:

- its Series Instance UID is stored under another Study Instance UID
  (:class:`SeriesInAnotherStudy`): a modality that reuses series UIDs would otherwise file
  the image, and its result, under another patient's study;
- its Study Instance UID is stored with another Patient ID (:class:`StudyOfAnotherPatient`).

Patient IDs are compared as the SCP stores them (surrounding spaces and NULs removed) and
exactly, case included (PS3.5: LO, leading and trailing spaces insignificant). An absent or
empty Patient ID (Type 2: "unknown") on either side contradicts nothing: an object without one
is filed under the stored study, and the first object that brings one sets it for the study.
Issuer of Patient ID is not stored and not compared.

The checks run in the same transaction as the insert, and the one write that could race
(setting the Patient ID of a study stored without one) is a conditional ``UPDATE``, so two
associations cannot both pass: on PostgreSQL the second ``UPDATE`` waits for the first
transaction and then re-reads the row; on SQLite writers are serialised. New studies and
series are guarded by their unique UIDs (the loser of an insert race retries through
:func:`db.session.in_transaction` and then meets the stored row).

Messages carry UIDs only, never patient identifiers: they go to logs and, shortened, to the
peer's Error Comment.
"""

from __future__ import annotations

from typing import Any, cast

from sqlalchemy import CursorResult, func, or_, select, update
from sqlalchemy.orm import Session
from sqlalchemy.orm.attributes import set_committed_value

from db.models import Series, Study


class IdentityConflict(Exception):  # noqa: N818 - a refusal, not a program error
    """The object contradicts the stored identity; nothing of it may be stored.

    ``comment`` is short enough for an Error Comment (LO, 64 characters); ``detail`` names
    the UIDs involved, for the log. Neither carries a patient identifier.
    """

    comment = "object contradicts the stored study identity"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class SeriesInAnotherStudy(IdentityConflict):
    comment = "Series Instance UID belongs to another Study Instance UID"


class StudyOfAnotherPatient(IdentityConflict):
    comment = "Study Instance UID is stored with another Patient ID"


def normalized_patient_id(value: str | None) -> str | None:
    """The Patient ID as compared: without surrounding spaces and NULs; empty is ``None``."""
    if value is None:
        return None
    return value.replace("\x00", "").strip() or None


def same_patient(stored: str | None, received: str | None) -> bool:
    """Whether a received Patient ID agrees with the stored one (unknown agrees with any)."""
    a, b = normalized_patient_id(stored), normalized_patient_id(received)
    return a is None or b is None or a == b


def series_conflict(series_uid: str, stored_study_uid: str, study_uid: str) -> None:
    """Raise :class:`SeriesInAnotherStudy` when the series is stored under another study."""
    if stored_study_uid != study_uid:
        raise SeriesInAnotherStudy(
            f"Series Instance UID {series_uid} is stored under Study Instance UID "
            f"{stored_study_uid}; the object names Study Instance UID {study_uid}"
        )


def _patient_conflict(study_uid: str) -> StudyOfAnotherPatient:
    return StudyOfAnotherPatient(
        f"Study Instance UID {study_uid} is stored with another Patient ID than the object's"
    )


def check_stored(
    session: Session, *, study_uid: str, series_uid: str, patient_id: str | None
) -> None:
    """Raise :class:`IdentityConflict` if the stored rows contradict the object (reads only).

    A check before anything is written; it is not atomic: :func:`claim_patient` and the
    series lookup of the insert repeat it inside the inserting transaction.
    """
    stored_study_uid = session.scalar(
        select(Study.study_instance_uid)
        .join(Series, Series.study_id == Study.id)
        .where(Series.series_instance_uid == series_uid)
    )
    if stored_study_uid is not None:
        series_conflict(series_uid, stored_study_uid, study_uid)
    row = session.execute(
        select(Study.patient_id).where(Study.study_instance_uid == study_uid)
    ).first()
    if row is not None and not same_patient(row[0], patient_id):
        raise _patient_conflict(study_uid)


def claim_patient(session: Session, study: Study, patient_id: str | None) -> None:
    """Check the object's Patient ID against a stored study, atomically; set it when the
    study has none yet. Raise :class:`StudyOfAnotherPatient` on a contradiction.

    ``study`` must be a persisted row. The conditional ``UPDATE`` decides on the row as it is
    when the write happens, not as it was read: of two associations bringing different
    Patient IDs for a study stored without one, exactly one succeeds.
    """
    pid = normalized_patient_id(patient_id)
    if pid is None:
        return  # unknown: contradicts nothing, sets nothing
    stored = func.nullif(func.trim(func.coalesce(Study.patient_id, "")), "")
    result = cast(
        CursorResult[Any],
        session.execute(
            update(Study)
            .where(Study.id == study.id, or_(stored.is_(None), stored == pid))
            .values(patient_id=func.coalesce(stored, pid))
            .execution_options(synchronize_session=False)
        ),
    )
    if result.rowcount != 1:
        raise _patient_conflict(study.study_instance_uid)
    set_committed_value(study, "patient_id", pid)
