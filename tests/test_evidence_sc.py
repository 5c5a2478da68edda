"""The evidence Secondary Capture: made by the classify task with the shipped model, valid for
dciodvfy, in the radiograph's study and referencing it, recorded (``results --json``),
referenced from the SR; images too small or uniform for a map keep their probability and say
why there is no capture; a destination that refuses captures is retried and recorded."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Evidence, EvidenceState, Instance, Result, SendStatus, SRDocument
from fracture_triage.messages import ClassifyInstance
from fracture_triage.results import collect_results
from fracture_triage.settings import Settings
from model.artifact import read_card, resolve_model_dir
from tests.conftest import require
from tests.servers import OrthancServer, free_port, orthanc_server
from tests.test_sr import assert_valid_sr, dciodvfy, measurement_groups
from tests.test_worker import make_sessions, record
from worker.sr import build_study_report
from worker.tasks import WorkerState, classify

RG3 = "CR_extremity_RG3_MONO1_10b_EVRLE.dcm"
HIP = "CR_hip_RG2_MONO2_10b_EVRLE.dcm"
TINY = "CR_cspine_MONO1_12b_16x16_tiny.dcm"  # 16 x 16 pixels
TWO_PIXELS = "DX_ForProcessing_GE_XR220_MONO1_10b_2x2px.dcm"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
STUDY = "1.2.826.0.1.3680043.10.1.77"


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def _settings(tmp_path: Path, **kw: object) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        database_url=f"sqlite:///{tmp_path / 'triage.db'}",
        broker_url="redis://127.0.0.1:1/0",  # no broker: the task bodies run in-process
        model_dir=resolve_model_dir(None),
        **kw,  # type: ignore[arg-type]
    )


def _classified(
    settings: Settings, sessions: sessionmaker[Session], sample: Path, study: str = STUDY
) -> Instance:
    """Record ``sample`` as the SCP would and run the classify task body on it."""
    instance = record(sessions, sample, study)
    msg = ClassifyInstance(instance_id=instance.id, sop_instance_uid=instance.sop_instance_uid)
    assert classify(WorkerState(settings), msg.model_dump()) == "done"
    return instance


def _evidence(sessions: sessionmaker[Session], instance_id: int) -> tuple[Result, Evidence]:
    with sessions() as session:
        result = session.scalars(select(Result).where(Result.instance_id == instance_id)).one()
        evidence = session.scalars(select(Evidence).where(Evidence.result_id == result.id)).one()
        return result, evidence


@pytest.mark.slow  # dciodvfy, dsrdump
def test_the_capture_is_valid_references_its_radiograph_and_the_sr_references_it(
    tmp_path: Path, dicom_samples: Path
) -> None:
    settings = _settings(tmp_path)
    sessions = make_sessions(settings.resolved_database_url)
    source_path = require(dicom_samples / RG3)
    instance = _classified(settings, sessions, source_path)
    result, evidence = _evidence(sessions, instance.id)
    assert evidence.state == EvidenceState.produced and evidence.reason is None
    assert evidence.send_status == SendStatus.none  # no destination configured
    path = Path(evidence.path or "")
    assert path.is_file() and path.parent.parent == settings.evidence_dir

    assert [line for line in dciodvfy(path) if line.startswith("Error")] == []
    sc = pydicom.dcmread(path)
    source = pydicom.dcmread(source_path, stop_before_pixels=True)
    assert sc.SOPClassUID == SECONDARY_CAPTURE and sc.SOPInstanceUID == evidence.sop_instance_uid
    assert sc.StudyInstanceUID == STUDY  # the study the node filed the radiograph in
    assert sc.PatientID == source.PatientID and sc.PatientName == source.PatientName
    assert sc.SeriesInstanceUID == evidence.series_instance_uid
    assert sc.SeriesInstanceUID != instance.series.series_instance_uid
    assert "not for primary diagnosis" in sc.SeriesDescription
    assert read_card(resolve_model_dir(None)).name in sc.SeriesDescription
    assert sc.BurnedInAnnotation == "YES"
    (ref,) = sc.SourceImageSequence
    assert (ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID) == (
        instance.sop_class_uid,
        instance.sop_instance_uid,
    )
    pixels = sc.pixel_array
    assert sc.PhotometricInterpretation == "RGB" and pixels.ndim == 3 and pixels.shape[2] == 3
    coloured = (pixels[..., 0].astype(int) - pixels[..., 2]) > 40
    # colour where the map is high, the radiograph left gray elsewhere
    assert 0.01 < coloured.mean() < 0.6, coloured.mean()

    rows = collect_results(sessions())
    (row,) = rows
    assert row["evidence_path"] == str(path) and row["evidence_state"] == "produced"
    assert row["probability"] == pytest.approx(result.probability, abs=1e-6)

    with sessions() as session:
        doc = build_study_report(
            session, settings, instance.series.study_id, WorkerState(settings).card()
        )
        session.commit()
    sr = assert_valid_sr(Path(doc.path))
    images = [
        item
        for group in measurement_groups(sr)
        for item in group[0].ContentSequence
        if item.ValueType == "IMAGE" and item.ConceptNameCodeSequence[0].CodeValue == "121200"
    ]
    (illustration,) = images
    referenced = illustration.ReferencedSOPSequence[0]
    assert referenced.ReferencedSOPInstanceUID == sc.SOPInstanceUID
    assert referenced.ReferencedSOPClassUID == SECONDARY_CAPTURE
    listed = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for i in s.ReferencedSOPSequence
    }
    assert {sc.SOPInstanceUID, instance.sop_instance_uid} <= listed


@pytest.mark.parametrize(("sample", "size"), [(TINY, "16x16"), (TWO_PIXELS, "2x2")])
def test_an_image_too_small_for_a_map_keeps_its_probability_and_says_why(
    tmp_path: Path, dicom_samples: Path, sample: str, size: str
) -> None:
    settings = _settings(tmp_path)
    sessions = make_sessions(settings.resolved_database_url)
    instance = _classified(settings, sessions, require(dicom_samples / sample))
    result, evidence = _evidence(sessions, instance.id)
    assert 0.0 <= result.probability <= 1.0
    assert evidence.state == EvidenceState.not_produced and evidence.path is None
    assert evidence.reason and f"is {size} pixels, smaller than 32 px" in evidence.reason
    (row,) = collect_results(sessions())
    assert row["status"] == "done" and row["probability"] is not None
    assert (row["evidence_path"], row["evidence_state"]) == (None, "not produced")
    assert row["evidence_reason"] == evidence.reason
    assert not settings.evidence_dir.exists() or not any(settings.evidence_dir.rglob("*.dcm"))


def test_a_uniform_image_keeps_its_probability_and_says_why(
    tmp_path: Path, dicom_samples: Path
) -> None:
    ds = pydicom.dcmread(require(dicom_samples / HIP))
    ds.PixelData = np.zeros((ds.Rows, ds.Columns), dtype=np.uint16).tobytes()
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    path = tmp_path / "uniform.dcm"
    ds.save_as(path)
    settings = _settings(tmp_path)
    sessions = make_sessions(settings.resolved_database_url)
    instance = _classified(settings, sessions, path)
    result, evidence = _evidence(sessions, instance.id)
    assert 0.0 <= result.probability <= 1.0
    assert evidence.state == EvidenceState.not_produced
    assert evidence.reason and "uniform" in evidence.reason


# --- a destination that stores SRs but refuses Secondary Captures --------------------------


@contextmanager
def picky_destination() -> Iterator[tuple[int, list[str]]]:
    """A real pynetdicom Storage SCP on loopback that stores SRs and answers Secondary
    Captures with 0xA700 (Refused: Out of Resources); yields its port and the SOP Class UIDs
    it was offered."""
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import (  # type: ignore[attr-defined]
        Comprehensive3DSRStorage,
        SecondaryCaptureImageStorage,
    )

    offered: list[str] = []

    def on_store(event: evt.Event) -> int:
        sop_class = str(event.request.AffectedSOPClassUID)
        offered.append(sop_class)
        return 0xA700 if sop_class == SECONDARY_CAPTURE else 0x0000

    ae = AE(ae_title="PICKY")
    for sop_class in (Comprehensive3DSRStorage, SecondaryCaptureImageStorage):
        ae.add_supported_context(sop_class, [ExplicitVRLittleEndian])
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    assert server is not None
    try:
        yield port, offered
    finally:
        server.shutdown()


@pytest.mark.slow  # a DICOM server on loopback
def test_a_refused_capture_is_retried_like_the_sr_and_its_failure_recorded(
    tmp_path: Path, dicom_samples: Path
) -> None:
    from worker.delivery import send_and_record
    from worker.sr_send import SendError

    with picky_destination() as (port, offered):
        settings = _settings(
            tmp_path,
            sr_destination_host="127.0.0.1",
            sr_destination_port=port,
            sr_destination_ae_title="PICKY",
            sr_send_retries=2,
        )
        sessions = make_sessions(settings.resolved_database_url)
        instance = _classified(settings, sessions, require(dicom_samples / RG3))
        _, evidence = _evidence(sessions, instance.id)
        assert evidence.send_status == SendStatus.pending
        with sessions() as session:
            doc = build_study_report(
                session, settings, instance.series.study_id, WorkerState(settings).card()
            )
            session.commit()

        # First attempt: the SR is stored, the capture refused: the delivery is not complete
        # (the result has not fully arrived), it will be retried.
        with pytest.raises(SendError, match="evidence capture .* not stored.*0xA700"):
            send_and_record(settings, sessions, doc.id)
        assert offered == [SECONDARY_CAPTURE, "1.2.840.10008.5.1.4.1.1.88.34"]
        with sessions() as session:
            sr_row = session.get(SRDocument, doc.id)
            ev = session.get(Evidence, evidence.id)
            assert sr_row is not None and ev is not None
            assert sr_row.send_status == SendStatus.pending
            assert (ev.send_status, ev.send_attempts) == (SendStatus.pending, 1)
            assert ev.send_error and "0xA700" in ev.send_error

        # The retry sends both again; refused again, it is the last attempt: gave up.
        assert send_and_record(settings, sessions, doc.id) == "failed"
        assert offered[2:] == [SECONDARY_CAPTURE, "1.2.840.10008.5.1.4.1.1.88.34"]
        with sessions() as session:
            ev = session.get(Evidence, evidence.id)
            assert ev is not None and (ev.send_status, ev.send_attempts) == (SendStatus.failed, 2)
            assert ev.send_error and "failed with status 0xA700" in ev.send_error
            sr_row = session.get(SRDocument, doc.id)
            assert sr_row is not None and sr_row.send_status == SendStatus.failed
            assert sr_row.send_error and "0xA700" in sr_row.send_error
        # Settled: a late redelivery sends nothing more.
        assert send_and_record(settings, sessions, doc.id) == "failed"
        assert len(offered) == 4


def test_decision_text_comes_from_one_place() -> None:
    from worker.evidence import caption, decision_text

    card = read_card(resolve_model_dir(None))
    t = card.threshold
    assert decision_text(t, t) == "fracture" and decision_text(t - 1e-6, t) == "no fracture"
    assert decision_text(0.5, 0.3, 0.8) == "doubt"  # between a card's two thresholds
    lines = caption(card, 0.91, t)
    assert "NOT FOR PRIMARY DIAGNOSIS" in lines[0] and lines[1].endswith(": fracture")
    assert "0.91" in lines[1]


def test_evidence_series_is_one_per_study_and_model() -> None:
    from fracture_triage.uids import is_valid_uid
    from worker.evidence import evidence_series_uid

    a = evidence_series_uid(STUDY, "2.25.1")
    assert is_valid_uid(a) and a == evidence_series_uid(STUDY, "2.25.1")
    assert a != evidence_series_uid(STUDY + ".1", "2.25.1") != evidence_series_uid(STUDY, "2.25.2")


# --- the real worker, the sweeper and Orthanc as the SR destination ------------------------


@pytest.mark.slow  # redis-server, a Celery worker, Orthanc
def test_the_worker_stores_the_captures_and_sends_them_with_the_sr(
    tmp_path: Path, dicom_samples: Path, orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two radiographs and one 16x16 image of a study through the real worker: each
    radiograph gets a capture in the data directory, recorded, referenced by the SR and
    stored in Orthanc with the SR; the tiny image gets its probability and "not produced"."""
    from tests.test_sr_send import orthanc_instance
    from tests.test_worker import (
        _all_reported,
        celery_worker,
        redis_node,
        scp_store,
        sweeper_thread,
        wait_until,
    )

    database_url = f"sqlite:///{tmp_path / 'triage.db'}"
    # the worker process reads its destination from the environment, like the other settings
    monkeypatch.setenv("FRACTURE_TRIAGE_SR_DESTINATION_HOST", "127.0.0.1")
    monkeypatch.setenv("FRACTURE_TRIAGE_SR_DESTINATION_PORT", str(orthanc.dicom_port))
    monkeypatch.setenv("FRACTURE_TRIAGE_SR_DESTINATION_AE_TITLE", orthanc.ae_title)
    with redis_node(
        tmp_path,
        database_url,
        resolve_model_dir(None),
        study_stable_seconds=1.0,
        sr_destination_host="127.0.0.1",
        sr_destination_port=orthanc.dicom_port,
        sr_destination_ae_title=orthanc.ae_title,
    ) as (settings, sessions, enqueuer):
        samples = [RG3, HIP, TINY]
        for name in samples:
            assert scp_store(sessions, enqueuer, require(dicom_samples / name), STUDY)
        with celery_worker(settings, tmp_path / "worker.log"), sweeper_thread(settings):

            def sent() -> bool:
                # reported first, then the documents read: read the other way round, an SR
                # committed between the two reads left an empty list, and all([]) is True
                if not _all_reported(sessions, 1):
                    return False
                with sessions() as session:
                    docs = session.scalars(select(SRDocument)).all()
                    return bool(docs) and all(d.send_status == "sent" for d in docs)

            wait_until(sent, 120, "the study's SR sent")
            with sessions() as session:
                evidence = {
                    Path(e.result.instance.storage_path).name: e
                    for e in session.scalars(select(Evidence))
                }
                doc = session.scalars(select(SRDocument)).one()
                produced = [evidence[RG3], evidence[HIP]]
                for e in produced:
                    assert e.state == EvidenceState.produced
                    assert Path(e.path or "").is_file()
                    assert (e.send_status, e.send_attempts, e.send_error) == ("sent", 1, None)
                    tags = orthanc_instance(orthanc, e.sop_instance_uid or "")
                    assert tags is not None, "the capture is not in Orthanc"
                    assert tags["StudyInstanceUID"] == STUDY
                    assert tags["SOPClassUID"] == SECONDARY_CAPTURE
                tiny = evidence[TINY]
                assert tiny.state == EvidenceState.not_produced and tiny.send_status == "none"
                assert tiny.reason and "16x16" in tiny.reason
                assert orthanc_instance(orthanc, doc.sop_instance_uid) is not None
                sr = pydicom.dcmread(doc.path)
                referenced = {
                    item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                    for group in sr.ContentSequence
                    if group.ValueType == "CONTAINER"
                    for sub in getattr(group, "ContentSequence", [])
                    for item in getattr(sub, "ContentSequence", [])
                    if item.ValueType == "IMAGE"
                    and item.ConceptNameCodeSequence[0].CodeValue == "121200"
                }
                assert referenced == {e.sop_instance_uid for e in produced}
        rows = {
            Path(r["evidence_path"]).name for r in collect_results(sessions()) if r["evidence_path"]
        }
        assert rows == {f"{e.sop_instance_uid}.dcm" for e in produced}
