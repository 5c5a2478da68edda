"""The evidence of one classified image as a DICOM Secondary Capture (PS3.3 A.8.1 SC Image
IOD): the radiograph with the network's class activation map over it and the result burned
in, in the image's study, in a series of its own.

- Patient, General Study and Patient Study modules as the SR has them
  (:func:`worker.sr.patient_study_header`: copied from the source, invalid values left out),
  a new series per study and model (Series Description naming the algorithm and "not for
  primary diagnosis", Series Number 9902, after the SR's 9901);
- General Image (PS3.3 C.7.6.1): Image Type DERIVED\\SECONDARY, Burned In Annotation YES
  (the probability and decision are text in the pixels), Source Image Sequence referencing
  the radiograph, Derivation Description saying how the picture was made; Patient
  Orientation as the source's (the picture is not rotated);
- SC Equipment (PS3.3 C.8.6.1): Conversion Type WSD (workstation), the algorithm as
  Contributing Equipment with the model card's UID as Device UID;
- Image Pixel: RGB, 8 bits, from :func:`model.imaging.overlay.evidence_picture`.

Entry point: :func:`make_evidence` (file written, nothing recorded: the classify task records
it with the result in one transaction). The decision words come from :func:`decision_text`
alone.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from db.evidence import EvidenceRecord
from db.models import EvidenceState, Instance, SendStatus, Study
from fracture_triage.files import write_atomic
from fracture_triage.settings import Settings
from fracture_triage.uids import is_valid_uid
from fracture_triage.verdict import decide
from model.artifact import ModelCard
from worker.sr import patient_study_header

log = logging.getLogger(__name__)

#: Series Number of the evidence series: after the SR's (9901), after the acquired series.
EVIDENCE_SERIES_NUMBER = 9902
_ORIENTATIONS = frozenset("AFHLPR")


def decision_text(probability: float, lower: float, upper: float | None = None) -> str:
    """The decision the evidence shows, in words: the node's one rule
    (:func:`fracture_triage.verdict.decide`: fracture / doubt / no fracture)."""
    return decide(probability, lower, upper).value


def series_description(card: ModelCard) -> str:
    """Series Description (LO, at most 64 characters): the algorithm and its status; a long
    model name is cut, never the status."""
    status = " - not for primary diagnosis"
    algorithm = f"{card.name} {card.version}"
    return algorithm[: 64 - len(status)] + status


def evidence_series_uid(study_instance_uid: str, model_uid: str) -> str:
    """The evidence series of a study and model: derived from both (UUID-derived UID, PS3.5
    B.2), so that workers classifying images of one study at once agree without asking."""
    name = f"fracture-triage evidence {study_instance_uid} {model_uid}"
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def caption(card: ModelCard, probability: float, threshold: float) -> list[str]:
    """The text burned into the capture (no patient data: the header carries it)."""
    upper = card.upper if card.upper > threshold else None
    limits = (
        f"threshold {threshold:.2f}"
        if upper is None
        else (f"doubt from {threshold:.2f}, fracture from {upper:.2f}")
    )
    return [
        f"{card.name} {card.version} - NOT FOR PRIMARY DIAGNOSIS",
        f"Fracture probability {probability:.2f} ({limits}): "
        f"{decision_text(probability, threshold, upper)}",
        "Colour: where the network found most evidence of fracture in this image",
    ]


def _patient_orientation(source: Dataset | None) -> list[str]:
    value = source.get("PatientOrientation") if source is not None else None
    values = list(value) if isinstance(value, pydicom.multival.MultiValue) else []
    if len(values) == 2 and all(v and set(str(v)) <= _ORIENTATIONS for v in values):
        return [str(v) for v in values]
    return []  # Type 2: unknown


def build_evidence_sc(
    header: Dataset,
    source: Dataset | None,
    instance_uids: tuple[str, str],
    picture: np.ndarray,
    card: ModelCard,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    instance_number: int,
) -> hd.sc.SCImage:
    """The Secondary Capture (pure: no database, no file). ``header`` from
    :func:`worker.sr.patient_study_header`; ``instance_uids`` the radiograph's SOP Class and
    SOP Instance UIDs; ``picture`` ``(H, W, 3)`` uint8."""
    equipment = hd.ContributingEquipment(
        manufacturer=card.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=card.name,
        software_versions=card.version,
        contribution_description="Fracture classification algorithm that made this picture",
    )
    equipment.DeviceUID = card.uid
    sc = hd.sc.SCImage(
        pixel_array=picture,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=header.StudyInstanceUID,
        series_instance_uid=series_instance_uid,
        series_number=EVIDENCE_SERIES_NUMBER,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=card.manufacturer,
        patient_orientation=("A", "F"),  # replaced below by the source's, or left empty
        contributing_equipment=[equipment],
        series_description=series_description(card),
        manufacturer_model_name=card.name,
        software_versions=card.version,
    )
    # The patient and study as the SR has them (valid source values only).
    for elem in header:
        sc[elem.tag] = elem
    sc.PatientOrientation = _patient_orientation(source)
    # General Series Laterality (Type 2C, for paired body parts): the source's, else empty
    laterality = source.get("Laterality") if source is not None else None
    sc.Laterality = laterality if laterality in ("R", "L") else ""
    sc.ConversionType = "WSD"  # made by a workstation (PS3.3 C.8.6.1), not digitised
    sc.BurnedInAnnotation = "YES"  # the result is text in the pixels (PS3.3 C.7.6.1.1.4)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = (
        "Radiograph rendered to 8-bit gray with the classifier's class activation map "
        "overlaid (coloured where it is highest) and the result burned in"
    )
    sop_class, sop_instance = instance_uids
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    sc.SourceImageSequence = [item]
    return sc


def encoded(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def read_source_header(path: str | Path) -> Dataset | None:
    """The stored radiograph without its pixels; None when it cannot be read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable file is just no header source
        log.info("cannot read header of %s: %s", path, type(exc).__name__)
        return None
    return ds if "StudyInstanceUID" in ds else None


@dataclass(frozen=True)
class MadeEvidence:
    """The outcome of :func:`make_evidence`: what to record and the file written (None when
    not produced), with the time it took."""

    record: EvidenceRecord
    path: Path | None
    ms: float
    #: of ``ms``, writing the file durably (fsync of the file and its folder)
    write_ms: float = 0.0


def _not_produced(reason: str, t0: float) -> MadeEvidence:
    record = EvidenceRecord(state=EvidenceState.not_produced, reason=reason)
    return MadeEvidence(record=record, path=None, ms=(time.perf_counter() - t0) * 1000)


def make_evidence(
    settings: Settings,
    instance: Instance,
    study: Study,
    card: ModelCard,
    gray: np.ndarray,
    cam: np.ndarray | None,
    probability: float,
    threshold: float,
) -> MadeEvidence:
    """Render, build and write the evidence capture of one classified instance (to
    ``settings.evidence_dir/<StudyInstanceUID>/<SOPInstanceUID>.dcm``, atomically).

    Anything that makes a picture impossible (too small, uniform, no map) or the capture
    unbuildable from the source's data is a ``not produced`` record with the reason: the
    probability stands either way. Reasons carry UIDs and sizes at most, never patient data.
    """
    from model.imaging.overlay import EvidenceError, evidence_picture

    t0 = time.perf_counter()
    study_uid = study.study_instance_uid
    uids = (instance.sop_class_uid, instance.sop_instance_uid)
    if not (is_valid_uid(study_uid) and all(is_valid_uid(u) for u in uids)):
        return _not_produced("the image's UIDs are not valid UIDs (PS3.5 9.1)", t0)
    try:
        picture = evidence_picture(gray, cam, caption(card, probability, threshold))
    except EvidenceError as exc:
        return _not_produced(str(exc), t0)
    source = read_source_header(instance.storage_path)
    series_uid = evidence_series_uid(study_uid, card.uid)
    sop_uid = str(hd.UID())
    try:
        sc = build_evidence_sc(
            patient_study_header(source, study),
            source,
            uids,
            picture,
            card,
            series_instance_uid=series_uid,
            sop_instance_uid=sop_uid,
            instance_number=instance.id,
        )
        content = encoded(sc)
    except (ValueError, TypeError, AttributeError) as exc:
        # highdicom and pydicom refuse what would be invalid; their messages may quote
        # values (patient data), so only the kind of error is kept.
        return _not_produced(
            f"the Secondary Capture cannot be built from the image's data ({type(exc).__name__})",
            t0,
        )
    target = settings.evidence_dir / study_uid / f"{sop_uid}.dcm"
    t_write = time.perf_counter()
    try:
        write_atomic(target, [content])
    except OSError as exc:
        return _not_produced(f"the Secondary Capture cannot be written ({exc.strerror})", t0)
    record = EvidenceRecord(
        state=EvidenceState.produced,
        path=str(target),
        sop_instance_uid=sop_uid,
        series_instance_uid=series_uid,
        send_status=SendStatus.pending if settings.sends_dicom else SendStatus.none,
    )
    t1 = time.perf_counter()
    return MadeEvidence(
        record=record, path=target, ms=(t1 - t0) * 1000, write_ms=(t1 - t_write) * 1000
    )
