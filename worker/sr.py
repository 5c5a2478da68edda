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
  image reference, a coded qualitative evaluation (SCT 72704001 "Fracture" = a value of
  CID 240 "Present-Absent": the image's decision (``fracture_triage.verdict``) fracture is
  SCT 52101004 Present, doubt SCT 373068000 Undetermined (with a TEXT comment naming the
  two thresholds it lies between), no fracture SCT 272519000 Absent) and the probability as
  a TID 300 numeric measurement (DCM 122157 "Probability", UCUM "1" no units); the TID 4019
  algorithm parameters give the two thresholds the decision was made with;
- an image whose evidence Secondary Capture was produced (``worker.evidence``: the radiograph
  with the network's class activation map) references it from its group as an IMAGE item
  (DCM 121200 "Illustration of ROI"), and the capture is listed in the Current Requested
  Procedure Evidence Sequence with the radiographs (PS3.3 C.17.2.3);
- an image that could not be classified keeps its group: "Fracture" = Undetermined and a
  TEXT comment giving the reason, so nothing received is silently left out; an image out
  of the model's scope (its Body Part Examined not in ``Settings.body_parts``) likewise,
  its comment "Not assessed: out of scope (CHEST)" naming the body part; a study whose
  images are all out of scope gets an SR of such groups only, with no probability;
- a report that replaces an earlier one of the same study lists it in the Predecessor
  Documents Sequence (PS3.3 C.17.2) and the older row is marked ``superseded_by``.

Entry point: :func:`build_study_report`, within the caller's transaction (the report task
commits). :func:`build_sr` is the pure DICOM part; the database part is ``db.repository`` and
``db.reports``.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import highdicom as hd
import pydicom
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.valuerep import PersonName, validate_value
from sqlalchemy.orm import Session

from db import reports, repository
from db.evidence import evidence_of_result
from db.models import EvidenceState, Instance, InstanceStatus, SendStatus, SRDocument, Study
from fracture_triage.attributes import STUDY_ATTRIBUTES
from fracture_triage.files import write_atomic
from fracture_triage.settings import Settings
from fracture_triage.uids import is_valid_uid
from fracture_triage.verdict import Decision, study_verdict
from model.artifact import ModelCard
from worker import standard_tables

log = logging.getLogger(__name__)

# Before highdicom builds anything here or in worker.evidence (which imports this module): its
# 22 MB table of the standard's modules is then read one module at a time, not kept whole.
standard_tables.install()

#: SNOMED CT 72704001 "Fracture" (morphologic abnormality): the evaluated finding.
FRACTURE = hd.sr.CodedConcept("72704001", "SCT", "Fracture")
#: CID 240 "Present-Absent" (PS3.16) values of the qualitative evaluation: SCT 52101004,
#: 272519000 and 373068000 (pydicom's codes are those of the context group).
PRESENT = hd.sr.CodedConcept.from_code(codes.SCT.Present)
ABSENT = hd.sr.CodedConcept.from_code(codes.SCT.Absent)
UNDETERMINED = hd.sr.CodedConcept.from_code(codes.SCT.Undetermined)
#: The evaluation of each decision level: doubt is neither present nor absent.
EVALUATION = {
    Decision.fracture: PRESENT,
    Decision.doubt: UNDETERMINED,
    Decision.no_fracture: ABSENT,
}
#: DCM 122157 "Probability", the model's output for "fracture present".
PROBABILITY = hd.sr.CodedConcept.from_code(codes.DCM.Probability)
#: UCUM "1" (CID 7181 "no units"): a probability is a pure number in [0, 1].
NO_UNITS = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)
#: SCT 168537006 "Plain radiography", the procedure reported (TID 1500 row 3).
PLAIN_RADIOGRAPHY = hd.sr.CodedConcept("168537006", "SCT", "Plain radiography")
#: DCM 121106 "Comment": free-text reason why an image has no result.
COMMENT = hd.sr.CodedConcept.from_code(codes.DCM.Comment)
#: DCM 121200 "Illustration of ROI": the evidence capture showing where the network looked.
ILLUSTRATION = hd.sr.CodedConcept.from_code(codes.DCM.IllustrationOfROI)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SERIES_DESCRIPTION = "AI fracture triage"
#: Series Number of the SR series: high, so it sorts after the acquired series.
SR_SERIES_NUMBER = 9901

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
#: Type 2 attributes of the Patient and General Study modules the database keeps: present,
#: empty if unknown; DICOM keyword -> ``studies`` column.
_TYPE2_FALLBACK = {a.keyword: a.name for a in STUDY_ATTRIBUTES if a.type2}


class ReportError(RuntimeError):
    """The study cannot be reported (unknown study, no instance, invalid UID): the reason is
    recorded on the study and the report is not attempted again for that revision. Reasons
    carry UIDs at most, never patient data."""


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
    upper_threshold: float | None = None
    #: The result's decision level; None for an image without a result.
    decision: Decision | None = None
    model_name: str | None = None
    model_version: str | None = None
    #: Why there is no result ("decode failed: ..."); no patient identifiers.
    reason: str | None = None
    #: The evidence Secondary Capture of the result (SOP Instance and Series Instance UID).
    evidence_sop_instance_uid: str | None = None
    evidence_series_instance_uid: str | None = None
    #: Not assessed because its Body Part Examined is outside the model's scope: ``reason``
    #: says "not assessed: out of scope (PART)"; it has no result and counts neither way.
    out_of_scope: bool = False


@dataclass(frozen=True)
class StudyFindings:
    """The study's result (:func:`fracture_triage.verdict.study_verdict`): flagged if any
    image is, decision = the highest image level, probability = the maximum."""

    fracture: bool
    probability: float | None
    images: tuple[ImageFinding, ...]
    decision: Decision | None = None

    @classmethod
    def combine(cls, images: Sequence[ImageFinding]) -> StudyFindings:
        verdict = study_verdict((i.probability, i.fracture, i.decision) for i in images)
        return cls(
            fracture=verdict.fracture,
            probability=verdict.probability,
            images=tuple(images),
            decision=verdict.decision,
        )


# --------------------------------------------------------------------------- DICOM part


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
    fallback: dict[str, str | None] = {
        keyword: getattr(study, name) for keyword, name in _TYPE2_FALLBACK.items()
    }
    if source is None and any(v and not v.isascii() for v in fallback.values()):
        header.SpecificCharacterSet = "ISO_IR 192"  # the database holds decoded text
    for keyword in _TYPE2_FALLBACK:
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


def _thresholds(finding: ImageFinding, card: ModelCard) -> tuple[float, float]:
    """The (lower, upper) thresholds of the finding's result, else the card's."""
    if finding.threshold is None:
        return card.threshold, card.upper
    upper = finding.upper_threshold
    return finding.threshold, finding.threshold if upper is None else upper


def _capture(header: Dataset, finding: ImageFinding) -> Dataset:
    """An image's evidence Secondary Capture as highdicom evidence (same study)."""
    ds = Dataset()
    ds.StudyInstanceUID = header.StudyInstanceUID
    ds.SeriesInstanceUID = finding.evidence_series_instance_uid
    ds.SOPInstanceUID = finding.evidence_sop_instance_uid
    ds.SOPClassUID = SECONDARY_CAPTURE
    return ds


def _algorithm(finding: ImageFinding, card: ModelCard) -> hd.sr.AlgorithmIdentification:
    # TID 4019 row 3, Algorithm Parameters: what the decision was made with.
    lower, upper = _thresholds(finding, card)
    return hd.sr.AlgorithmIdentification(
        name=finding.model_name or card.name,
        version=finding.model_version or card.version,
        parameters=[f"lower_threshold={lower:g}", f"upper_threshold={upper:g}"],
        manufacturer=card.manufacturer,
    )


def _decision(finding: ImageFinding) -> Decision:
    """The level of an assessed finding (a finding without one: by its flag)."""
    if finding.decision is not None:
        return finding.decision
    return Decision.fracture if finding.fracture else Decision.no_fracture


def _referencable(finding: ImageFinding) -> bool:
    """A source whose UIDs are malformed cannot be referenced without invalidating the SR."""
    return is_valid_uid(finding.sop_instance_uid) and is_valid_uid(finding.sop_class_uid)


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
    decision: Decision | None = None
    if finding.probability is not None:
        decision = _decision(finding)
        evaluation = EVALUATION[decision]
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
    if not assessed and finding.out_of_scope:
        # Not a failure: the model was not asked (its body part is outside the model's
        # scope, ``fracture_triage.scope``); the reason names the body part.
        reason = finding.reason or "not assessed: out of scope"
        group[0].ContentSequence.append(_comment(reason[:1].upper() + reason[1:]))
    elif not assessed:
        group[0].ContentSequence.append(
            _comment(f"Not assessable: {finding.reason or 'not classified'}")
        )
    elif decision == Decision.doubt:
        # Undetermined with a probability: say why, so it does not read as "not assessable".
        lower, upper = _thresholds(finding, card)
        group[0].ContentSequence.append(
            _comment(
                f"Doubt: probability {finding.probability:.4f} is at or above the lower "
                f"threshold {lower:g} and below the upper threshold {upper:g}"
            )
        )
    if not sources:
        group[0].ContentSequence.append(
            _comment(f"Source image UID is not a valid UID: {finding.sop_instance_uid[:80]}")
        )
    if finding.evidence_sop_instance_uid is not None:
        group[0].ContentSequence.append(
            hd.sr.ImageContentItem(
                name=ILLUSTRATION,
                referenced_sop_class_uid=SECONDARY_CAPTURE,
                referenced_sop_instance_uid=finding.evidence_sop_instance_uid,
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
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
    evidence += [_capture(header, f) for f in findings.images if f.evidence_sop_instance_uid]
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
    result = repository.result_to_report(session, instance.id, card.version)
    uids = (
        instance.sop_instance_uid,
        instance.sop_class_uid,
        instance.series.series_instance_uid,
    )
    if result is not None:
        evidence = evidence_of_result(session, result.id)
        produced = evidence is not None and evidence.state == EvidenceState.produced
        return ImageFinding(
            *uids,
            probability=result.probability,
            fracture=result.fracture,
            threshold=result.threshold,
            upper_threshold=result.upper_threshold,
            decision=result.decision,
            model_name=result.model_name,
            model_version=result.model_version,
            evidence_sop_instance_uid=evidence.sop_instance_uid if produced and evidence else None,
            evidence_series_instance_uid=(
                evidence.series_instance_uid if produced and evidence else None
            ),
        )
    if instance.status == InstanceStatus.out_of_scope:
        return ImageFinding(
            *uids,
            probability=None,
            fracture=None,
            reason=instance.failure_reason or "not assessed: out of scope",
            out_of_scope=True,
        )
    if instance.status == InstanceStatus.failed:
        reason = instance.failure_reason or "failed"
    else:
        reason = f"not classified (status {instance.status.value})"
    return ImageFinding(*uids, probability=None, fracture=None, reason=reason)


def _predecessor(doc: SRDocument, study_uid: str) -> Dataset:
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = doc.series_instance_uid
    ds.SOPInstanceUID = doc.sop_instance_uid
    ds.SOPClassUID = COMPREHENSIVE_3D_SR
    return ds


def _encoded(sr: Dataset) -> bytes:
    buffer = io.BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def build_study_report(
    session: Session, settings: Settings, study_id: int, card: ModelCard
) -> SRDocument:
    """Build, store and record the SR of one study at its current revision, in ``session``'s
    transaction: the caller commits (or, on :class:`ReportError`, records the failure).

    Idempotent: if an SR for the study's current revision already exists (a redelivered
    task), that row is returned and nothing is written. Otherwise the SR covers every
    instance of the study (a group per image, failed ones included), is written atomically
    to ``settings.sr_dir/<StudyInstanceUID>/<SOPInstanceUID>.dcm`` and recorded
    (:func:`db.reports.record_report`: ``send_status`` pending when a destination is
    configured, else none; the study's earlier current SR is superseded by it and listed in
    its Predecessor Documents Sequence; ``study.reported_revision`` is set). A file whose
    transaction is then not committed is named by no row and never sent.

    Raises :class:`ReportError` when the study is unknown, has no instance, has a Study
    Instance UID that is not a UID (PS3.5 9.1) or the SR cannot be built from its data.
    """
    study = session.get(Study, study_id)
    if study is None:
        raise ReportError(f"no study with id {study_id}")
    revision = study.revision or 0
    existing = reports.report_of_revision(session, study_id, revision)
    if existing is not None:
        return existing
    study_uid = study.study_instance_uid
    if not is_valid_uid(study_uid):  # it names the SR and its folder: PS3.5 9.1 or nothing
        raise ReportError(f"Study Instance UID {study_uid[:80]!r} is not a valid UID (PS3.5 9.1)")
    instances = repository.study_instances(session, study_id)
    if not instances:
        raise ReportError(f"study {study_uid} has no instance")
    images = [_finding(session, inst, card) for inst in instances]
    findings = StudyFindings.combine(images)
    source = next(
        (h for h in (_read_header(i.storage_path) for i in instances) if h is not None),
        None,
    )
    previous = reports.study_reports(session, study_id)
    current = [d for d in previous if d.superseded_by_id is None]
    # One SR series per study: later reports join the series of the first one.
    series_uid = previous[0].series_instance_uid if previous else hd.UID()
    sop_uid = hd.UID()
    try:
        sr = build_sr(
            patient_study_header(source, study),
            findings,
            card,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            instance_number=len(previous) + 1,
            predecessors=[_predecessor(d, study_uid) for d in current],
        )
        content = _encoded(sr)
    except (ValueError, TypeError, AttributeError) as exc:
        # highdicom and pydicom refuse what would make an invalid document; their messages
        # may quote values (patient data), so only the kind of error is kept.
        raise ReportError(
            f"the SR cannot be built from the study's data ({type(exc).__name__})"
        ) from exc
    target = settings.sr_dir / study_uid / f"{sop_uid}.dcm"
    write_atomic(target, [content])
    try:
        doc = reports.record_report(
            session,
            reports.ProducedReport(
                study_id=study_id,
                study_revision=revision,
                sop_instance_uid=str(sop_uid),
                series_instance_uid=str(series_uid),
                path=str(target),
                fracture=findings.fracture,
                probability=findings.probability,
                instance_count=len(images),
                send_status=SendStatus.pending if settings.all_destinations else SendStatus.none,
                decision=None if findings.decision is None else findings.decision.value,
            ),
            destinations=settings.all_destinations,
        )
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    if doc.sop_instance_uid != sop_uid:  # another worker recorded this revision first
        target.unlink(missing_ok=True)
    log.info(
        "SR %s for study %s revision %d: %d images, decision=%s",
        doc.sop_instance_uid,
        study_uid,
        revision,
        len(images),
        None if findings.decision is None else findings.decision.value,
    )
    return doc
