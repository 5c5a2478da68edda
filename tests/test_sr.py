"""The study's DICOM SR: built from real results and real sample headers, checked with
dicom3tools' dciodvfy, dcmtk's dsrdump and highdicom, recorded and superseded in the
database (SQLite and PostgreSQL)."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db import repository as repo
from db.models import Base, Instance, SRDocument, Study
from db.session import make_engine, make_session_factory
from fracture_triage.files import TEMP_PREFIX
from fracture_triage.settings import Settings
from model.artifact import ModelCard
from tests.conftest import require
from worker import sr as srmod
from worker.sr import build_study_report

CARD = ModelCard(
    name="test-mobilenetv2",
    version="test-0",
    uid="2.25.1234567890",
    threshold=0.5,
    input_size=64,
)
RG3 = "CR_extremity_RG3_MONO1_10b_EVRLE.dcm"
RG3_J2K = "CR_extremity_RG3_MONO1_10b_J2K_lossless.dcm"
RG3_JLS = "CR_extremity_RG3_MONO1_10b_JPEGLS_lossless.dcm"
RG3_BAD = "BAD_CR_extremity_RG3_JPEGExtended_SOS_Se0.dcm"
PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "StudyID",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDescription",
)


def dciodvfy(path: Path) -> list[str]:
    """dciodvfy's messages; the test fails on any line starting with "Error"."""
    out = subprocess.run(
        ["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, errors="replace"
    )
    lines = (out.stdout + out.stderr).splitlines()
    print(f"dciodvfy {path.name}:", *lines, sep="\n  ")
    return lines


def assert_valid_sr(path: Path) -> hd.sr.Comprehensive3DSR:
    errors = [line for line in dciodvfy(path) if line.startswith("Error")]
    assert errors == []
    dump = subprocess.run(
        ["dsrdump", str(path)], capture_output=True, text=True, timeout=60, errors="replace"
    )
    assert dump.returncode == 0, dump.stdout + dump.stderr
    assert "Imaging Measurement Report" in dump.stdout
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    return sr


@pytest.fixture
def session_factory(database_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(database_url)
    Base.metadata.create_all(engine)
    yield make_session_factory(engine)
    engine.dispose()


def receive(sf: sessionmaker[Session], path: Path, failure: str | None = None) -> int:
    """Record a sample as the SCP does; return its instance id."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    rec = repo.ReceivedInstance(
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        storage_path=str(path),
        modality=ds.get("Modality"),
        patient_id=ds.get("PatientID"),
        patient_name=str(ds.get("PatientName", "")),
        accession_number=ds.get("AccessionNumber"),
        study_date=ds.get("StudyDate"),
    )
    with sf() as session:
        instance, _ = repo.record_received(session, rec)
        if failure:
            repo.mark_failed(session, instance.id, failure)
        session.commit()
        return instance.id


def classify(sf: sessionmaker[Session], instance_id: int, probability: float) -> None:
    c = repo.Classification(
        probability=probability,
        threshold=CARD.threshold,
        fracture=probability >= CARD.threshold,
        model_name=CARD.name,
        model_version=CARD.version,
        model_uid=CARD.uid,
        preprocess_ms=3.0,
        inference_ms=9.0,
    )
    with sf() as session:
        repo.save_result(session, instance_id, c)
        session.commit()


def report(sf: sessionmaker[Session], settings: Settings, study_id: int) -> SRDocument:
    """What the report task does: build and record the SR in one unit of work, commit."""
    with sf() as session:
        doc = build_study_report(session, settings, study_id, CARD)
        session.commit()
        return doc


def study_id_of(sf: sessionmaker[Session], instance_id: int) -> int:
    with sf() as session:
        instance = session.get(Instance, instance_id)
        assert instance is not None
        return instance.series.study_id


def measurement_groups(
    sr: hd.sr.Comprehensive3DSR,
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    return report.get_image_measurement_groups()


def groups_by_image(
    sr: hd.sr.Comprehensive3DSR,
) -> dict[str, hd.sr.MeasurementsAndQualitativeEvaluations]:
    out: dict[str, hd.sr.MeasurementsAndQualitativeEvaluations] = {}
    for group in measurement_groups(sr):
        (source,) = group.source_images
        out[source.referenced_sop_instance_uid] = group
    return out


def algorithm_names(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> list[str]:
    return [
        item.TextValue
        for item in group[0].ContentSequence  # type: ignore[index]
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111001"
    ]


@pytest.mark.slow  # dciodvfy and dsrdump
def test_study_sr_is_valid_and_complete(
    session_factory: sessionmaker[Session], dicom_samples: Path, tmp_path: Path
) -> None:
    settings = Settings(data_dir=tmp_path)
    flagged = receive(session_factory, require(dicom_samples / RG3))
    normal = receive(session_factory, require(dicom_samples / RG3_J2K))
    failed = receive(
        session_factory,
        require(dicom_samples / RG3_BAD),
        failure="decode failed: libjpeg error -1038",
    )
    classify(session_factory, flagged, 0.82)
    classify(session_factory, normal, 0.31)
    study_id = study_id_of(session_factory, flagged)

    doc = report(session_factory, settings, study_id)

    path = Path(doc.path)
    assert path.parent.parent == settings.sr_dir and path.is_file()
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    assert (doc.fracture, doc.probability, doc.instance_count) == (True, 0.82, 3)
    assert doc.send_status == "none" and doc.superseded_by_id is None
    sr = assert_valid_sr(path)

    # IHE AIR: same study and patient as the source, a new SR series.
    source = pydicom.dcmread(dicom_samples / RG3, stop_before_pixels=True)
    for keyword in PATIENT_STUDY:
        assert sr.get(keyword) == source.get(keyword), keyword
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.SeriesInstanceUID == doc.series_instance_uid != source.SeriesInstanceUID
    assert sr.SOPInstanceUID == doc.sop_instance_uid
    # Contributing Equipment names the algorithm; the Device UID is the model's UID.
    (equipment,) = [e for e in sr.ContributingEquipmentSequence if e.get("DeviceUID") == CARD.uid]
    assert equipment.Manufacturer == CARD.manufacturer
    assert equipment.ManufacturerModelName == CARD.name
    assert equipment.SoftwareVersions == CARD.version
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"

    # One group per image, each with TID 4019, its source image and the evaluation.
    groups = groups_by_image(sr)
    with session_factory() as session:
        uids = {
            i: session.get(Instance, i).sop_instance_uid  # type: ignore[union-attr]
            for i in (flagged, normal, failed)
        }
    assert set(groups) == set(uids.values())
    expected = {
        flagged: ("52101004", 0.82),
        normal: ("272519000", 0.31),
        failed: ("373068000", None),
    }
    for instance_id, (code, probability) in expected.items():
        group = groups[uids[instance_id]]
        assert algorithm_names(group) == [CARD.name]
        (evaluation,) = group.get_qualitative_evaluations()  # type: ignore[attr-defined]
        assert evaluation.name == srmod.FRACTURE
        assert evaluation.value.value == code  # type: ignore[union-attr]  # a CodedConcept
        measurements = group.get_measurements()  # type: ignore[attr-defined]
        if probability is None:
            assert measurements == []
            texts = [i.TextValue for i in group[0].ContentSequence if i.ValueType == "TEXT"]
            assert any("Not assessable: decode failed" in t for t in texts)
        else:
            (m,) = measurements
            assert m.name == codes.DCM.Probability
            assert m.value == pytest.approx(probability)
            assert m.unit == codes.UCUM.NoUnits
    with session_factory() as session:
        study = session.get(Study, study_id)
        assert study is not None and study.reported_revision == study.revision


@pytest.mark.slow  # dciodvfy and dsrdump
def test_more_images_give_a_superseding_sr(
    session_factory: sessionmaker[Session], dicom_samples: Path, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        sr_destination_host="127.0.0.1",
        sr_destination_port=104,
        sr_destination_ae_title="PACS",
    )
    first = receive(session_factory, require(dicom_samples / RG3))
    classify(session_factory, first, 0.2)
    study_id = study_id_of(session_factory, first)
    old = report(session_factory, settings, study_id)
    assert (old.fracture, old.probability, old.send_status) == (False, 0.2, "pending")
    # A redelivered task for the same revision writes nothing new.
    again = report(session_factory, settings, study_id)
    assert again.id == old.id
    assert len(list(Path(old.path).parent.glob("*.dcm"))) == 1

    later = receive(session_factory, require(dicom_samples / RG3_JLS))
    classify(session_factory, later, 0.9)
    new = report(session_factory, settings, study_id)

    assert new.id != old.id and (new.fracture, new.probability, new.instance_count) == (
        True,
        0.9,
        2,
    )
    with session_factory() as session:
        docs = session.scalars(select(SRDocument).order_by(SRDocument.id)).all()
        assert [d.superseded_by_id for d in docs] == [new.id, None]
        assert repo.latest_report(session, study_id).id == new.id  # type: ignore[union-attr]
    sr = assert_valid_sr(Path(new.path))
    (pred,) = sr.PredecessorDocumentsSequence
    assert pred.StudyInstanceUID == sr.StudyInstanceUID
    (series,) = pred.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == old.series_instance_uid
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == old.sop_instance_uid
    assert sr.SeriesInstanceUID == old.series_instance_uid and sr.InstanceNumber == 2
    assert len(measurement_groups(sr)) == 2


def texts_of(group: hd.sr.MeasurementsAndQualitativeEvaluations, code: str) -> list[str]:
    return [
        item.TextValue
        for item in group[0].ContentSequence  # type: ignore[index]
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == code
    ]


@pytest.mark.slow  # dciodvfy and dsrdump
def test_three_levels_are_present_undetermined_and_absent_with_both_thresholds(
    session_factory: sessionmaker[Session], dicom_samples: Path, tmp_path: Path
) -> None:
    """A card with thresholds 0.3 / 0.7: an image at 0.55 is doubt, reported Undetermined
    with its probability (not as "not assessable"); every group names both thresholds."""
    card = ModelCard(**{**CARD.__dict__, "threshold": 0.3, "upper_threshold": 0.7})
    ids = [receive(session_factory, require(dicom_samples / n)) for n in (RG3, RG3_J2K, RG3_JLS)]
    for instance_id, p in zip(ids, (0.82, 0.55, 0.1), strict=True):
        c = repo.Classification(
            probability=p,
            threshold=card.threshold,
            upper_threshold=card.upper_threshold,
            fracture=p >= card.threshold,
            model_name=card.name,
            model_version=card.version,
            model_uid=card.uid,
            preprocess_ms=1.0,
            inference_ms=1.0,
        )
        with session_factory() as session:
            repo.save_result(session, instance_id, c)
            session.commit()
    with session_factory() as session:
        doc = build_study_report(
            session, Settings(data_dir=tmp_path), study_id_of(session_factory, ids[0]), card
        )
        session.commit()
        uids = [session.get(Instance, i).sop_instance_uid for i in ids]  # type: ignore[union-attr]
    assert (doc.fracture, doc.probability) == (True, 0.82)
    groups = groups_by_image(assert_valid_sr(Path(doc.path)))
    expected = [
        (uids[0], codes.SCT.Present, 0.82),
        (uids[1], codes.SCT.Undetermined, 0.55),
        (uids[2], codes.SCT.Absent, 0.1),
    ]
    assert [c.value for c in (codes.SCT.Present, codes.SCT.Undetermined, codes.SCT.Absent)] == [
        "52101004",  # CID 240 "Present-Absent"
        "373068000",
        "272519000",
    ]
    for uid, code, probability in expected:
        group = groups[uid]
        (evaluation,) = group.get_qualitative_evaluations()  # type: ignore[attr-defined]
        assert evaluation.value == code
        (m,) = group.get_measurements()  # type: ignore[attr-defined]
        assert m.value == pytest.approx(probability)
        assert texts_of(group, "111002") == ["lower_threshold=0.3", "upper_threshold=0.7"]
        comments = texts_of(group, "121106")
        if code == codes.SCT.Undetermined:
            assert comments == [
                "Doubt: probability 0.5500 is at or above the lower threshold 0.3 and below "
                "the upper threshold 0.7"
            ]
        else:
            assert comments == []


@pytest.mark.slow  # dciodvfy and dsrdump
def test_study_with_only_failed_images_is_reported(
    session_factory: sessionmaker[Session], dicom_samples: Path, tmp_path: Path
) -> None:
    bad = receive(session_factory, require(dicom_samples / RG3_BAD), failure="decode failed")
    doc = report(session_factory, Settings(data_dir=tmp_path), study_id_of(session_factory, bad))
    assert (doc.fracture, doc.probability, doc.instance_count) == (False, None, 1)
    sr = assert_valid_sr(Path(doc.path))
    (group,) = measurement_groups(sr)
    assert group.get_qualitative_evaluations()[0].value == codes.SCT.Undetermined


@pytest.mark.slow  # dciodvfy and dsrdump
@pytest.mark.parametrize(
    "sample",
    [
        # Patient's Name and other text in an undeclared character set.
        "DX_chest_MONO2_16b_J2K_lossless_0Padding.dcm",
        # Patient's Age "81" (invalid AS), minimal header without Study Date.
        "SC_modDX_chest_NIH_MONO2_8b_IVRLE.dcm",
        # Non-human patient (species), Cyrillic character set, no pixel data.
        "BAD_DX_extremity_noPixelData_VOILUTSeq_Agfa.dcm",
        # SOP Instance UID with leading zeros: cannot be referenced.
        "CR_MONO1_10b_ModalityLUTSeq_JPEGLosslessSV1.dcm",
    ],
)
def test_malformed_source_headers_still_give_a_valid_sr(
    dicom_samples: Path, tmp_path: Path, sample: str
) -> None:
    source = pydicom.dcmread(require(dicom_samples / sample), stop_before_pixels=True)
    study = Study(study_instance_uid=source.StudyInstanceUID)
    header = srmod.patient_study_header(source, study)
    image = srmod.ImageFinding(
        sop_instance_uid=source.SOPInstanceUID,
        sop_class_uid=source.SOPClassUID,
        series_instance_uid=source.SeriesInstanceUID,
        probability=0.6,
        fracture=True,
    )
    sr = srmod.build_sr(
        header,
        srmod.StudyFindings.combine([image]),
        CARD,
        series_instance_uid=hd.UID(),
        sop_instance_uid=hd.UID(),
        instance_number=1,
    )
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    out = assert_valid_sr(path)
    assert out.StudyInstanceUID == source.StudyInstanceUID
    assert "PatientAge" not in out or out.PatientAge == source.PatientAge
    if source.get("SpecificCharacterSet"):
        assert out.PatientName == source.PatientName  # declared charset: copied exactly


def test_concurrent_reports_of_one_revision_record_one_sr(
    session_factory: sessionmaker[Session], dicom_samples: Path, tmp_path: Path
) -> None:
    """Redelivered or duplicated report tasks running at once leave one SR per revision."""
    import threading

    from sqlalchemy.exc import OperationalError

    settings = Settings(data_dir=tmp_path)
    instance = receive(session_factory, require(dicom_samples / RG3))
    classify(session_factory, instance, 0.66)
    study_id = study_id_of(session_factory, instance)
    barrier = threading.Barrier(3)
    docs: list[tuple[int, str, str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        for _ in range(3):  # a Celery retry after a transient database conflict
            try:
                doc = report(session_factory, settings, study_id)
                docs.append((doc.id, doc.sop_instance_uid, doc.path))
                return
            except OperationalError:  # SQLite: write from a stale snapshot refused
                continue
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == [] and len(docs) == 3
    assert len(set(docs)) == 1, docs
    with session_factory() as session:
        assert len(session.scalars(select(SRDocument)).all()) == 1
    files = list((settings.sr_dir).rglob("*.dcm"))
    assert [str(f) for f in files] == [docs[0][2]]
    assert not list(settings.sr_dir.rglob(f"{TEMP_PREFIX}*"))
