"""Sending SRs with C-STORE to a real PACS: Orthanc from apt, on loopback."""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy.orm import Session, sessionmaker

from db.deliveries import resend
from db.models import SRDocument
from fracture_triage.settings import LEGACY_DESTINATION, Settings
from tests.conftest import require
from tests.servers import OrthancServer, free_port, orthanc_server
from tests.test_sr import RG3, RG3_BAD, classify, receive, report, session_factory, study_id_of
from worker.delivery import send_and_record
from worker.sr_send import SendError, send_report

__all__ = ["session_factory"]  # the fixture, shared with test_sr


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    with orthanc_server(tmp_path_factory.mktemp("orthanc")) as server:
        yield server


def settings_for(tmp_path: Path, orthanc: OrthancServer, ae_title: str | None = None) -> Settings:
    return Settings(
        data_dir=tmp_path,
        ae_title="FXTRIAGE",
        sr_destination_host="127.0.0.1",
        sr_destination_port=orthanc.dicom_port,
        sr_destination_ae_title=ae_title or orthanc.ae_title,
    )


def orthanc_instance(orthanc: OrthancServer, sop_instance_uid: str) -> dict[str, str] | None:
    """The simplified tags of the instance Orthanc stored with this SOP Instance UID."""
    found = orthanc.get_json("/tools/lookup", data=sop_instance_uid.encode())
    assert isinstance(found, list)
    for item in found:
        if item["Type"] == "Instance":
            tags = orthanc.get_json(f"/instances/{urllib.parse.quote(item['ID'])}/simplified-tags")
            assert isinstance(tags, dict)
            return tags
    return None


def test_sr_built_from_results_arrives_in_orthanc(
    session_factory: sessionmaker[Session],
    dicom_samples: Path,
    tmp_path: Path,
    orthanc: OrthancServer,
) -> None:
    settings = settings_for(tmp_path, orthanc)
    flagged = receive(session_factory, require(dicom_samples / RG3))
    receive(session_factory, require(dicom_samples / RG3_BAD), failure="decode failed")
    classify(session_factory, flagged, 0.77)
    doc = report(session_factory, settings, study_id_of(session_factory, flagged))
    assert doc.send_status == "pending"

    assert send_and_record(settings, session_factory, doc.id) == "sent"

    source = pydicom.dcmread(dicom_samples / RG3, stop_before_pixels=True)
    instances = orthanc.get_json("/instances")
    assert isinstance(instances, list) and instances
    tags = orthanc_instance(orthanc, doc.sop_instance_uid)
    assert tags is not None, "the SR is not in Orthanc"
    assert tags["StudyInstanceUID"] == source.StudyInstanceUID
    assert tags["PatientID"] == source.PatientID
    assert tags["Modality"] == "SR"
    assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"
    with session_factory() as session:
        row = session.get(SRDocument, doc.id)
        assert row is not None
        assert (row.send_status, row.send_attempts, row.send_error) == ("sent", 1, None)
        assert row.sent_at is not None
    # A redelivered send task does not send (or count) again.
    assert send_and_record(settings, session_factory, doc.id) == "exists"
    with session_factory() as session:
        assert session.get(SRDocument, doc.id).send_attempts == 1  # type: ignore[union-attr]


def test_failed_sends_raise_and_are_recorded(
    session_factory: sessionmaker[Session],
    dicom_samples: Path,
    tmp_path: Path,
    orthanc: OrthancServer,
) -> None:
    # Orthanc checks the called AE title: a wrong one is rejected at association.
    wrong_aet = settings_for(tmp_path, orthanc, ae_title="NOTORTHANC").model_copy(
        update={"sr_send_retries": 2}
    )
    flagged = receive(session_factory, require(dicom_samples / RG3))
    classify(session_factory, flagged, 0.4)
    doc = report(session_factory, wrong_aet, study_id_of(session_factory, flagged))
    with pytest.raises(SendError, match="association"):
        send_and_record(wrong_aet, session_factory, doc.id)
    with session_factory() as session:
        row = session.get(SRDocument, doc.id)
        assert row is not None
        assert (row.send_status, row.send_attempts) == ("pending", 1)
        assert row.send_error and "association" in row.send_error

    # Nothing listens on the port: the last allowed attempt (2 of 2) gives up, and says so.
    nobody = wrong_aet.model_copy(update={"sr_destination_port": free_port()})
    assert send_and_record(nobody, session_factory, doc.id) == "failed"
    with session_factory() as session:
        row = session.get(SRDocument, doc.id)
        assert row is not None and (row.send_status, row.send_attempts) == ("failed", 2)
        assert row.send_error and "not established" in row.send_error
    # A late redelivery does not try again once it gave up.
    assert send_and_record(settings_for(tmp_path, orthanc), session_factory, doc.id) == "failed"
    assert orthanc_instance(orthanc, doc.sop_instance_uid) is None

    # Put back by `resend --failed`, it goes to the right destination and says so.
    with session_factory() as session:
        requeued = resend(session, gave_up=True)
        session.commit()
    assert requeued is not None and [(r.destination, r.was) for r in requeued] == [
        (LEGACY_DESTINATION, "gave up")
    ]
    assert send_and_record(settings_for(tmp_path, orthanc), session_factory, doc.id) == "sent"
    with session_factory() as session:
        row = session.get(SRDocument, doc.id)
        assert row is not None and (row.send_status, row.send_attempts) == ("sent", 1)
    assert orthanc_instance(orthanc, doc.sop_instance_uid) is not None


def test_send_without_destination_raises(tmp_path: Path) -> None:
    with pytest.raises(SendError, match="no SR destination"):
        send_report(Settings(data_dir=tmp_path), tmp_path / "missing.dcm")
