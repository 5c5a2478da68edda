"""The study's result as a DICOM Structured Report (Comprehensive 3D SR, TID 1500 root).

The document follows IHE AI Results (AIR):

- same Study Instance UID, Patient and General Study / Patient Study modules as the source
  images (copied from a stored source instance, so a PACS files it in the right study),
  a new series, Modality SR (PS3.3 A.35.13 Comprehensive 3D SR IOD);
- Contributing Equipment Sequence (PS3.3 C.12.1, SOP Common) naming the algorithm:
  manufacturer, model name, software version and Device UID = the model card's UID, which
  changes whenever the model changes;
- TID 1500 "Measurement Report" (PS3.16) with one TID 1501 measurement group per image,
  each holding TID 4108 tracking identifiers, TID 4019 algorithm identification, the source
  image reference, a coded qualitative evaluation (SCT 72704001 "Fracture" =
  CID 240 Present / Absent / Undetermined) and the probability as a TID 300 numeric
  measurement (DCM 122157 "Probability", UCUM "1" no units);
- an image that could not be classified keeps its group: "Fracture" = Undetermined and a
  TEXT comment giving the reason, so nothing received is silently left out;
- a report that replaces an earlier one of the same study lists it in the Predecessor
  Documents Sequence (PS3.3 C.17.2) and the older row is marked ``superseded_by``.

Entry point: :func:`build_study_report`. :func:`build_sr` is the pure DICOM part.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import PersonName, validate_value
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, InstanceStatus, Result, SRDocument, Study
from db.repository import study_instances, utcnow
from fracture_triage.settings import Settings
from model.artifact import ModelCard

log = logging.getLogger(__name__)

#: SNOMED CT 72704001 "Fracture" (morphologic abnormality): the evaluated finding.
FRACTURE = hd.sr.CodedConcept("72704001", "SCT", "Fracture")
#: CID 240 "Present-Absent" values of the qualitative evaluation.
PRESENT = hd.sr.CodedConcept.from_code(codes.SCT.Present)
ABSENT = hd.sr.CodedConcept.from_code(codes.SCT.Absent)
UNDETERMINED = hd.sr.CodedConcept.from_code(codes.SCT.Undetermined)
#: DCM 122157 "Probability", the model's output for "fracture present".
PROBABILITY = hd.sr.CodedConcept.from_code(codes.DCM.Probability)
#: UCUM "1" (CID 7181 "no units"): a probability is a pure number in [0, 1].
NO_UNITS = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)
#: SCT 168537006 "Plain radiography", the procedure reported (TID 1500 row 3).
PLAIN_RADIOGRAPHY = hd.sr.CodedConcept("168537006", "SCT", "Plain radiography")
#: DCM 121106 "Comment": free-text reason why an image has no result.
COMMENT = hd.sr.CodedConcept.from_code(codes.DCM.Comment)

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SERIES_DESCRIPTION = "AI fracture triage"
#: Series Number of the SR series: high, so it sorts after the acquired series.
SR_SERIES_NUMBER = 9901

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

#: Patient, General Study and Patient Study attributes copied from the source (PS3.3 C.7.1.1,
#: C.7.2.1, C.7.2.2), when their value is valid: a malformed source value (e.g. an AS age
#: "81") would make the SR itself invalid.
_PATIENT_STUDY_KEYWORDS = (
    # Patient module
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "TypeOfPatientID",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientSex",
    "PatientSexNeutered",
    "OtherPatientIDsSequence",
    "PatientComments",
    "EthnicGroup",
    "PatientSpeciesDescription",
    "PatientSpeciesCodeSequence",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsiblePersonRole",
    "ResponsibleOrganization",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    # General Study module
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "ReferringPhysicianIdentificationSequence",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "ProcedureCodeSequence",
    "ReasonForPerformedProcedureCodeSequence",
    # Patient Study module
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "Occupation",
    "AdditionalPatientHistory",
)
#: Type 2 attributes of the Patient and General Study modules: present, empty if unknown.
_TYPE2_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


class ReportError(RuntimeError):
    """The study cannot be reported (unknown study, no instance)."""


@dataclass(frozen=True)
class ImageFinding:
    """What the SR says about one received image."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    #: None when the image has no result (failed, or not classified yet).
    probability: float | None
    fracture: bool | None
    threshold: float | None = None
    model_name: str | None = None
    model_version: str | None = None
    #: Why there is no result ("decode failed: ..."); no patient identifiers.
    reason: str | None = None


@dataclass(frozen=True)
class StudyFindings:
    """The study's result: fracture if any image is flagged, probability = the maximum."""

    fracture: bool
    probability: float | None
    images: tuple[ImageFinding, ...]

    @classmethod
    def combine(cls, images: Sequence[ImageFinding]) -> StudyFindings:
        scored = [i for i in images if i.probability is not None]
        return cls(
            fracture=any(bool(i.fracture) for i in scored),
            probability=max((float(i.probability) for i in scored), default=None),  # type: ignore[arg-type]
            images=tuple(images),
        )


# --------------------------------------------------------------------------- DICOM part


def _is_uid(value: object) -> bool:
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.match(value))


_TEXT_VRS = frozenset({"AE", "CS", "DS", "IS", "LO", "LT", "PN", "SH", "ST", "UC", "UT"})
#: Attributes a non-human patient must carry (PS3.3 C.7.1.1, Type 2C).
_NON_HUMAN_TYPE2C = (
    "PatientSexNeutered",
    "PatientBreedDescription",
    "PatientBreedCodeSequence",
    "BreedRegistrationSequence",
    "ResponsiblePerson",
    "ResponsibleOrganization",
)


def _valid_element(ds: Dataset, keyword: str) -> bool:
    """Whether the source value of ``keyword`` can be copied without making the SR invalid.

    Checks the PS3.5 rules pydicom knows (length, format of AS/DA/TM/UI...) and, when the
    source declares no Specific Character Set, that text is plain ASCII: bytes of an
    undeclared character set would be invalid in the SR too.
    """
    elem = ds.data_element(keyword)
    if elem is None:
        return False
    if elem.VR == "SQ":
        return True
    values = elem.value if elem.VM > 1 else [elem.value]
    declared = ds.get("SpecificCharacterSet")
    for v in values:
        if v is None or v == "":
            continue
        try:
            validate_value(elem.VR, v, validation_mode=config.RAISE)
        except (ValueError, TypeError):
            return False
        if elem.VR in _TEXT_VRS and not declared and not str(v).isascii():
            return False
    return True


def patient_study_header(source: Dataset | None, study: Study) -> Dataset:
    """Patient and study attributes for the SR, copied from the source instance.

    Values from ``source`` (a stored instance of the study) are copied exactly; values that
    do not conform to their VR are dropped (Type 3) or left empty (Type 2), and a missing
    source falls back to what the database recorded for the study.
    """
    header = Dataset()
    if source is not None:
        if "SpecificCharacterSet" in source:
            header.SpecificCharacterSet = source.SpecificCharacterSet
        for keyword in _PATIENT_STUDY_KEYWORDS:
            if keyword in source and _valid_element(source, keyword):
                elem = source.data_element(keyword)
                assert elem is not None
                header.add(elem)
    fallback = {
        "PatientName": study.patient_name,
        "PatientID": study.patient_id,
        "PatientBirthDate": study.patient_birth_date,
        "PatientSex": study.patient_sex,
        "StudyDate": study.study_date,
        "StudyTime": study.study_time,
        "ReferringPhysicianName": study.referring_physician_name,
        "StudyID": study.study_id,
        "AccessionNumber": study.accession_number,
    }
    if source is None and any(v and not v.isascii() for v in fallback.values()):
        header.SpecificCharacterSet = "ISO_IR 192"  # the database holds decoded text
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in header:
            value = fallback.get(keyword)
            setattr(header, keyword, value or "")
            if value and not _valid_element(header, keyword):
                setattr(header, keyword, "")
    if "PatientSpeciesDescription" in header or "PatientSpeciesCodeSequence" in header:
        for keyword in _NON_HUMAN_TYPE2C:
            if keyword not in header:
                setattr(header, keyword, [] if keyword.endswith("Sequence") else "")
    # The SR belongs to the study the database knows, whatever the source file says.
    header.StudyInstanceUID = study.study_instance_uid
    if isinstance(header.PatientName, str):
        header.PatientName = PersonName(header.PatientName)
    return header


def _evidence(header: Dataset, finding: ImageFinding, first: bool) -> Dataset:
    """A referenced image as highdicom evidence (only the first carries patient/study)."""
    ds = Dataset()
    if first:
        ds.update(header)
    ds.StudyInstanceUID = header.StudyInstanceUID
    ds.SeriesInstanceUID = finding.series_instance_uid
    ds.SOPInstanceUID = finding.sop_instance_uid
    ds.SOPClassUID = finding.sop_class_uid
    return ds


def _algorithm(finding: ImageFinding, card: ModelCard) -> hd.sr.AlgorithmIdentification:
    threshold = finding.threshold if finding.threshold is not None else card.threshold
    return hd.sr.AlgorithmIdentification(
        name=finding.model_name or card.name,
        version=finding.model_version or card.version,
        parameters=[f"threshold={threshold:g}"],
        manufacturer=card.manufacturer,
    )


def _referencable(finding: ImageFinding) -> bool:
    """A source whose UIDs are malformed cannot be referenced without invalidating the SR."""
    return _is_uid(finding.sop_instance_uid) and _is_uid(finding.sop_class_uid)


def _comment(text: str) -> hd.sr.TextContentItem:
    # TID 1501 row 9: qualitative evaluation as TEXT, here why the image has no result.
    return hd.sr.TextContentItem(
        name=COMMENT,
        value=text[:1024],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


def _measurement_group(
    index: int, finding: ImageFinding, card: ModelCard
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group for one image: evaluation, probability, algorithm, source image."""
    sources = []
    if _referencable(finding):
        sources.append(
            hd.sr.SourceImageForMeasurementGroup(
                referenced_sop_class_uid=finding.sop_class_uid,
                referenced_sop_instance_uid=finding.sop_instance_uid,
            )
        )
    assessed = finding.probability is not None
    if finding.probability is not None:
        evaluation = PRESENT if finding.fracture else ABSENT
        measurements = [
            hd.sr.Measurement(
                name=PROBABILITY, value=round(float(finding.probability), 6), unit=NO_UNITS
            )
        ]
    else:
        evaluation, measurements = UNDETERMINED, []
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=hd.UID(), identifier=f"Image {index} fracture classification"
        ),
        algorithm_id=_algorithm(finding, card),
        measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(FRACTURE, evaluation)],
        source_images=sources or None,
    )
    if not assessed:
        group[0].ContentSequence.append(
            _comment(f"Not assessable: {finding.reason or 'not classified'}")
        )
    if not sources:
        group[0].ContentSequence.append(
            _comment(f"Source image UID is not a valid UID: {finding.sop_instance_uid[:80]}")
        )
    return group


def build_sr(
    header: Dataset,
    findings: StudyFindings,
    card: ModelCard,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
    predecessors: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """Build the SR document (pure: no database, no file).

    ``header`` comes from :func:`patient_study_header`; ``predecessors`` are datasets with
    StudyInstanceUID, SeriesInstanceUID, SOPInstanceUID and SOPClassUID of the SRs this one
    replaces.
    """
    if not findings.images:
        raise ReportError("a study report needs at least one image")
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=card.uid,
            name=card.name,
            manufacturer_name=card.manufacturer,
            model_name=card.name,
        ),
    )
    groups = [_measurement_group(i + 1, f, card) for i, f in enumerate(findings.images)]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PLAIN_RADIOGRAPHY,
        imaging_measurements=groups,
    )
    referencable = [f for f in findings.images if _referencable(f)]
    evidence = [_evidence(header, f, first=i == 0) for i, f in enumerate(referencable)]
    if not evidence:  # highdicom needs one dataset to take patient and study from
        evidence = [_evidence(header, findings.images[0], first=True)]
    equipment = hd.ContributingEquipment(
        manufacturer=card.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=card.name,
        software_versions=card.version,
        contribution_description="Fracture classification algorithm that made this report",
    )
    # Device UID (0018,1002) in the Contributing Equipment item: changes with every model.
    equipment.DeviceUID = card.uid
    # Local time, like the source's Study Date/Time; no Timezone Offset From UTC is claimed.
    now = datetime.now()
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=card.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=list(predecessors) or None,
        contributing_equipment=[equipment],
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=card.name,
        software_versions=card.version,
        content_date=now.date(),
        content_time=now.time(),
    )
    # highdicom copies patient/study attributes from evidence[0]; put back our header so
    # invalid source values it may have re-added stay out.
    for elem in header:
        sr[elem.tag] = elem
    if not referencable and "CurrentRequestedProcedureEvidenceSequence" in sr:
        # Only a malformed UID was there to list: the SR references no instance at all.
        del sr.CurrentRequestedProcedureEvidenceSequence
    return sr


# --------------------------------------------------------------------------- database part


def _read_header(path: str) -> Dataset | None:
    """Read a stored instance without its pixels; None if it cannot be read at all."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file just is no header source
        log.info("cannot read header of %s: %s", path, type(exc).__name__)
        return None
    # A truncated file can come back as an empty dataset without an exception.
    if "StudyInstanceUID" not in ds or "PatientID" not in ds and "PatientName" not in ds:
        return None
    return ds


def _finding(session: Session, instance: Instance, card: ModelCard) -> ImageFinding:
    result = session.scalars(
        select(Result).where(
            Result.instance_id == instance.id, Result.model_version == card.version
        )
    ).first()
    if result is None:
        # A result from another model version is still a result: report it under that model.
        result = session.scalars(
            select(Result).where(Result.instance_id == instance.id).order_by(Result.id.desc())
        ).first()
    uids = (
        instance.sop_instance_uid,
        instance.sop_class_uid,
        instance.series.series_instance_uid,
    )
    if result is not None:
        return ImageFinding(
            *uids,
            probability=result.probability,
            fracture=result.fracture,
            threshold=result.threshold,
            model_name=result.model_name,
            model_version=result.model_version,
        )
    if instance.status == InstanceStatus.failed:
        reason = instance.failure_reason or "failed"
    else:
        reason = f"not classified (status {instance.status.value})"
    return ImageFinding(*uids, probability=None, fracture=None, reason=reason)


def _write_atomically(sr: Dataset, target: Path) -> None:
    """Write to a temporary file in the target folder, fsync, rename, fsync the folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            sr.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _predecessor(doc: SRDocument, study_uid: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = doc.series_instance_uid
    ds.SOPInstanceUID = doc.sop_instance_uid
    ds.SOPClassUID = COMPREHENSIVE_3D_SR
    return ds


def build_study_report(
    session_factory: sessionmaker[Session], settings: Settings, study_id: int, card: ModelCard
) -> SRDocument:
    """Build, store and record the SR of one study at its current revision.

    Idempotent: if an SR for the study's current revision already exists (a redelivered
    task), that row is returned and nothing is written. Otherwise the SR covers every
    instance of the study (a group per image, failed ones included), is written atomically
    to ``settings.sr_dir/<StudyInstanceUID>/<SOPInstanceUID>.dcm``, recorded as an
    :class:`SRDocument` (``send_status`` "pending" when a destination is configured, else
    "none"), the study's earlier current SR is marked ``superseded_by`` it and listed in its
    Predecessor Documents Sequence, and ``study.reported_revision`` is set.

    Raises :class:`ReportError` when the study is unknown or has no instance.
    """
    with session_factory() as session:
        study = session.get(Study, study_id)
        if study is None:
            raise ReportError(f"no study with id {study_id}")
        revision = study.revision or 0
        existing = session.scalars(
            select(SRDocument).where(
                SRDocument.study_id == study_id, SRDocument.study_revision == revision
            )
        ).first()
        if existing is not None and Path(existing.path).is_file():
            return existing
        instances = study_instances(session, study_id)
        if not instances:
            raise ReportError(f"study {study.study_instance_uid} has no instance")
        images = [_finding(session, inst, card) for inst in instances]
        findings = StudyFindings.combine(images)
        source = next(
            (h for h in (_read_header(i.storage_path) for i in instances) if h is not None),
            None,
        )
        header = patient_study_header(source, study)
        previous = session.scalars(
            select(SRDocument).where(SRDocument.study_id == study_id).order_by(SRDocument.id)
        ).all()
        current = [d for d in previous if d.superseded_by_id is None]
        # One SR series per study: later reports join the series of the first one.
        series_uid = previous[0].series_instance_uid if previous else hd.UID()
        sop_uid = hd.UID()
        sr = build_sr(
            header,
            findings,
            card,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            instance_number=len(previous) + 1,
            predecessors=[_predecessor(d, study.study_instance_uid) for d in current],
        )
        study_uid = study.study_instance_uid
        if not _is_uid(study_uid):  # the path is built from validated UIDs only
            raise ReportError(f"invalid Study Instance UID {study_uid!r}")
        target = settings.sr_dir / study_uid / f"{sop_uid}.dcm"
        _write_atomically(sr, target)
        try:
            doc = _record(session, study, revision, sr, target, findings, settings)
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        if doc.sop_instance_uid != sop_uid:  # another worker recorded this revision first
            target.unlink(missing_ok=True)
        log.info(
            "SR %s for study %s revision %d: %d images, fracture=%s",
            doc.sop_instance_uid,
            study_uid,
            revision,
            len(images),
            findings.fracture,
        )
        return doc


def _record(
    session: Session,
    study: Study,
    revision: int,
    sr: Dataset,
    path: Path,
    findings: StudyFindings,
    settings: Settings,
) -> SRDocument:
    # Take the write lock before looking for an SR of this revision, so two workers cannot
    # both find none and record two: a (no-op) UPDATE of the study row locks the row on
    # PostgreSQL and, on SQLite, opens the write transaction (pysqlite issues BEGIN only
    # before a write; the SELECTs before it see no snapshot, and SELECT ... FOR UPDATE is
    # ignored there).
    session.execute(update(Study).where(Study.id == study.id).values(revision=Study.revision))
    locked = session.scalars(select(Study).where(Study.id == study.id)).one()
    session.refresh(locked)
    existing = session.scalars(
        select(SRDocument).where(
            SRDocument.study_id == study.id, SRDocument.study_revision == revision
        )
    ).first()
    if existing is not None and Path(existing.path).is_file():
        # Another worker recorded this revision while we built ours; keep theirs (no
        # rollback here: it would expire the row the caller reads after the session).
        return existing
    doc = SRDocument(
        study_id=study.id,
        study_revision=revision,
        sop_instance_uid=str(sr.SOPInstanceUID),
        series_instance_uid=str(sr.SeriesInstanceUID),
        path=str(path),
        created_at=utcnow(),
        fracture=findings.fracture,
        probability=findings.probability,
        instance_count=len(findings.images),
        send_status="pending" if settings.sr_destination else "none",
        send_attempts=0,
    )
    session.add(doc)
    session.flush()
    for old in session.scalars(
        select(SRDocument).where(
            SRDocument.study_id == study.id,
            SRDocument.superseded_by_id.is_(None),
            SRDocument.id != doc.id,
        )
    ):
        old.superseded_by_id = doc.id
    if locked.reported_revision is None or locked.reported_revision < revision:
        locked.reported_revision = revision
    session.commit()
    return doc
