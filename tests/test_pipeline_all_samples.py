"""Every sample file through the running node, and every SR to a real PACS.

``fracture-triage up`` (embedded Redis, SCP, Celery worker, sweeper; tiny test model) is
started with Orthanc as its SR destination. Each file of ../shared/dicom-samples is sent with
pynetdicom on an association of its own that proposes one presentation context: the file's
SOP class in the file's own transfer syntax (Implicit VR Little Endian for the bare data set
without File Meta, PS3.10 7.1). Then:

- each SOP Instance UID whose first successfully sent file decodes (the shared
  ``model.imaging.load_gray_uint8`` raises no ``PreprocessError``) ends ``done`` with one
  probability, and is referenced by its study's latest SR;
- each ``BAD_`` file is refused (at negotiation, or it cannot even be sent), answered with a
  failure status, or recorded ``failed`` with a reason: never classified;
- files repeating a SOP Instance UID are answered Success and neither stored nor classified
  again (PS3.4 B.4.1: the SCP may ignore a duplicate);
- every SR the node produced was sent to Orthanc by the worker (C-STORE, PS3.4 B.2), is
  found there by its SOP Instance UID, and its database row says ``sent``;
- the node answers C-ECHO at the end, and Ctrl-C stops it with exit status 0.
"""

from __future__ import annotations

import functools
import json
import signal
import subprocess
import time
import urllib.parse
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pynetdicom._config
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select

from db.models import Instance, Result, SRDocument, Study
from db.session import make_engine, make_session_factory
from fracture_triage.uids import is_valid_uid
from model.imaging import PreprocessError, load_gray_uint8
from tests.servers import OrthancServer, orthanc_server
from tests.test_cli_up import (  # noqa: F401 - ``node`` is a fixture, used by name
    _referenced_sops,
    _results,
    _wait_for_banner,
    node,
)

SUCCESS = 0x0000
#: Outcome of a file that never reached a C-STORE request: refused at association
#: negotiation, or without the UIDs an SCU needs to send it at all.
REFUSED = "refused"
#: Outcome of a C-STORE that got no response (association aborted).
NO_RESPONSE = "no response"


@dataclass
class Sent:
    name: str
    sop_instance_uid: str | None
    transfer_syntax: str | None
    outcome: int | str  # DIMSE status, REFUSED or NO_RESPONSE
    detail: str = ""


def _is_bad(name: str) -> bool:
    return name.startswith(("BAD_", "DERIVED_BAD_"))


@functools.cache
def _decodes(path: Path) -> bool:
    """Whether the shared preprocessing (training, worker) turns the file into an image."""
    try:
        load_gray_uint8(path)
    except PreprocessError:
        return False
    return True


def _send(port: int, path: Path) -> Sent:
    """One file, one association, one presentation context (its SOP class, its syntax)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # broken samples warn; the outcome is asserted
            ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001 - pydicom cannot read it: nothing an SCU can send
        return Sent(path.name, None, None, REFUSED, f"unreadable: {exc}")
    sop_class = ds.get("SOPClassUID")
    uid = ds.get("SOPInstanceUID")
    if not sop_class or not uid:
        return Sent(path.name, None, None, REFUSED, "no SOP Class or SOP Instance UID")
    uid = str(uid)
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not syntax:  # a bare data set: Implicit VR Little Endian is the default (PS3.5 10.1)
        if meta is None:
            ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
        syntax = ImplicitVRLittleEndian
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = 131072
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    ae.add_requested_context(str(sop_class), [str(syntax)])
    assoc = ae.associate("127.0.0.1", port, ae_title="FXTRIAGE")
    if not assoc.is_established:
        return Sent(path.name, uid, str(syntax), REFUSED, "association not established")
    try:
        if not assoc.accepted_contexts:
            return Sent(path.name, uid, str(syntax), REFUSED, "presentation context rejected")
        try:
            rsp = assoc.send_c_store(ds)
        except (ValueError, AttributeError, TypeError) as exc:
            if not meta or not meta.get("TransferSyntaxUID"):
                return Sent(path.name, uid, str(syntax), REFUSED, f"not sendable: {exc}")
            # pydicom cannot encode what it read (e.g. explicit VR declared, implicit VR
            # found): send the file's data set bytes as they are, as a plain SCU would.
            pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True
            try:
                rsp = assoc.send_c_store(path)
            finally:
                pynetdicom._config.STORE_SEND_CHUNKED_DATASET = False
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in rsp:
        return Sent(path.name, uid, str(syntax), NO_RESPONSE)
    return Sent(path.name, uid, str(syntax), int(rsp.Status), str(rsp.get("ErrorComment", "")))


def _echo(port: int) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="FXTRIAGE")
    assert assoc.is_established
    status = int(assoc.send_c_echo().Status)
    assoc.release()
    return status


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[OrthancServer]:
    with orthanc_server(tmp_path / "orthanc") as server:
        yield server


@pytest.fixture
def node_to_pacs(
    orthanc: OrthancServer, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> dict[str, object]:
    """``up`` (the ``node`` fixture of test_cli_up) with Orthanc as its SR destination."""
    monkeypatch.setenv("FRACTURE_TRIAGE_SR_DESTINATION_HOST", "127.0.0.1")
    monkeypatch.setenv("FRACTURE_TRIAGE_SR_DESTINATION_PORT", str(orthanc.dicom_port))
    monkeypatch.setenv("FRACTURE_TRIAGE_SR_DESTINATION_AE_TITLE", orthanc.ae_title)
    monkeypatch.setenv("FRACTURE_TRIAGE_STUDY_STABLE_SECONDS", "1")
    monkeypatch.setenv("FRACTURE_TRIAGE_SWEEPER_INTERVAL_SECONDS", "0.5")
    info: dict[str, object] = request.getfixturevalue("node")
    return info


def _orthanc_instance(orthanc: OrthancServer, sop_instance_uid: str) -> dict[str, object] | None:
    """The simplified tags of the instance Orthanc holds with this SOP Instance UID."""
    found = orthanc.get_json("/tools/lookup", data=sop_instance_uid.encode())
    assert isinstance(found, list)
    for item in found:
        if item.get("Type") == "Instance":
            path = f"/instances/{urllib.parse.quote(item['ID'])}/simplified-tags"
            tags = orthanc.get_json(path)
            assert isinstance(tags, dict)
            return tags
    return None


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_every_sample_through_the_node_and_every_sr_to_orthanc(
    node_to_pacs: dict[str, object], orthanc: OrthancServer, dicom_samples: Path
) -> None:
    info = node_to_pacs
    data_dir = Path(str(info["data_dir"]))
    port = int(str(info["port"]))
    proc = info["proc"]
    assert isinstance(proc, subprocess.Popen)
    err_log = Path(str(info["err"]))
    _wait_for_banner(info)

    # --- send every file, in sorted filename order ---------------------------------------------
    files = sorted(dicom_samples.glob("*.dcm"))
    assert len(files) >= 40
    started = time.monotonic()
    sent = [_send(port, path) for path in files]
    send_s = time.monotonic() - started
    assert _echo(port) == SUCCESS  # still serving after every broken file
    print(f"sent {len(files)} files in {send_s:.1f} s")

    for s in sent:
        assert s.outcome != NO_RESPONSE, f"{s.name}: association aborted without a response"
        if s.sop_instance_uid and not is_valid_uid(s.sop_instance_uid):
            # A UID that breaks PS3.5 9.1 (e.g. a component "01") could not be referenced by
            # the SR: the SCP refuses it with a failure status that says so.
            assert s.outcome != SUCCESS and "PS3.5 9.1" in s.detail, f"{s.name}: {s.outcome!r}"
        elif not _is_bad(s.name) and _decodes(dicom_samples / s.name):
            # A radiograph the node can classify is never refused.
            assert s.outcome == SUCCESS, f"{s.name}: {s.outcome!r} {s.detail}"
        if isinstance(s.outcome, int) and s.outcome != SUCCESS:
            assert s.detail, f"{s.name}: failure 0x{s.outcome:04X} without an Error Comment"

    # The first file answered Success with a UID is the instance; later ones are duplicates.
    first: dict[str, Sent] = {}
    duplicates: list[Sent] = []
    for s in sent:
        if s.outcome == SUCCESS and s.sop_instance_uid:
            if s.sop_instance_uid in first:
                duplicates.append(s)
            else:
                first[s.sop_instance_uid] = s
    expect_done = {u for u, s in first.items() if _decodes(dicom_samples / s.name)}
    expect_failed = set(first) - expect_done
    assert len(expect_done) >= 25 and duplicates, (len(expect_done), duplicates)
    # Answered with a failure status (and recorded, where the SCP could read a UID).
    refused_with_status = {
        s.sop_instance_uid
        for s in sent
        if isinstance(s.outcome, int) and s.outcome != SUCCESS and s.sop_instance_uid
    } - set(first)

    # --- wait: every instance settled, every study reported, every SR sent ---------------------
    engine = make_engine(f"sqlite:///{data_dir / 'triage.db'}")
    sessions = make_session_factory(engine)
    deadline = time.monotonic() + 300
    rows: dict[str, dict[str, object]] = {}
    try:
        while True:
            rows = {str(r["sop_instance_uid"]): r for r in _results(data_dir)}
            settled = all(u in rows and rows[u]["status"] in ("done", "failed") for u in first)
            if settled:
                with sessions() as session:
                    # Sending is over, so revisions are final: every study (failed images
                    # are reported too) reported at its revision, and every SR sent.
                    docs = session.scalars(select(SRDocument)).all()
                    all_studies = session.scalars(select(Study)).all()
                    reported = all(st.reported_revision == st.revision for st in all_studies)
                    all_sent = bool(docs) and all(d.send_status == "sent" for d in docs)
                if reported and all_sent:
                    break
            if proc.poll() is not None:
                pytest.fail(f"up died: {err_log.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(
                    f"not settled after 300 s: {json.dumps(list(rows.values()), indent=1)}\n"
                    f"{err_log.read_text()[-4000:]}"
                )
            time.sleep(1.0)
        print(f"all classified, reported and sent {time.monotonic() - started:.1f} s after start")

        # --- each instance: one row, one outcome -----------------------------------------------
        assert set(first) <= set(rows) <= set(first) | refused_with_status
        for uid in expect_done:
            row = rows[uid]
            assert row["status"] == "done", (first[uid].name, row)
            assert isinstance(row["probability"], float) and 0.0 <= row["probability"] <= 1.0
            assert isinstance(row["fracture"], bool)
            assert row["failure_reason"] is None
        for uid in expect_failed | (set(rows) & refused_with_status):
            row = rows[uid]
            assert row["status"] == "failed", (first.get(uid), row)
            assert row["failure_reason"], row
            assert row["probability"] is None and row["fracture"] is None, row

        # Every BAD_ file: not sent, a failure status, or a recorded failure; never a result.
        for s in sent:
            if not _is_bad(s.name):
                continue
            if s.outcome == SUCCESS:
                assert s.sop_instance_uid in expect_failed, f"{s.name} would be classified"
            else:
                assert isinstance(s.outcome, int) or s.outcome == REFUSED, s
        print(
            "outcomes: "
            + ", ".join(
                f"{s.name}={s.outcome if isinstance(s.outcome, str) else hex(s.outcome)}"
                for s in sent
                if _is_bad(s.name)
            )
        )

        with sessions() as session:
            instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
            result_counts = dict(
                session.execute(
                    select(Instance.sop_instance_uid, func.count(Result.id))
                    .join(Result, Result.instance_id == Instance.id)
                    .group_by(Instance.sop_instance_uid)
                ).all()
            )
            docs = session.scalars(select(SRDocument).order_by(SRDocument.id)).all()
            study_uid = {st.id: st.study_instance_uid for st in session.scalars(select(Study))}
        # Classified exactly once (one result per instance and model version).
        assert {u: result_counts.get(u) for u in expect_done} == dict.fromkeys(expect_done, 1)
        assert not set(result_counts) - expect_done
        # Duplicates: Success, but the instance keeps the first file's object and row.
        for dup in duplicates:
            assert dup.sop_instance_uid is not None
            instance = instances[dup.sop_instance_uid]
            winner = first[dup.sop_instance_uid]
            assert instance.transfer_syntax_uid == winner.transfer_syntax, (dup, winner)
            stored = pydicom.dcmread(instance.storage_path, stop_before_pixels=True)
            assert stored.file_meta.TransferSyntaxUID == winner.transfer_syntax, dup.name
        print(f"{len(duplicates)} duplicates: " + ", ".join(d.name for d in duplicates))

        # --- SRs: the latest of each study covers its classified images ----------------------
        studies: dict[str, set[str]] = {}
        for uid in expect_done:
            studies.setdefault(str(rows[uid]["study_instance_uid"]), set()).add(uid)
        for study, sops in studies.items():
            sr_paths = {str(rows[u]["sr_path"]) for u in sops}
            assert len(sr_paths) == 1 and "None" not in sr_paths, (study, sr_paths)
            sr = pydicom.dcmread(sr_paths.pop())
            assert sr.StudyInstanceUID == study and sr.Modality == "SR"
            # Every stored image has a UID by PS3.5 9.1 (the SCP refuses others), so the SR
            # references each one.
            missing = sops - _referenced_sops(sr)
            assert not missing, f"study {study}: SR lacks {missing}"

        # --- SRs: each one sent by the worker and stored by Orthanc ---------------------------
        latest = {str(r["sr_sop_instance_uid"]) for r in rows.values() if r["sr_sop_instance_uid"]}
        assert latest <= {d.sop_instance_uid for d in docs}
        for doc in docs:
            assert doc.send_status == "sent" and doc.sent_at is not None, doc.send_error
            assert doc.send_attempts >= 1
            tags = _orthanc_instance(orthanc, doc.sop_instance_uid)
            assert tags is not None, f"SR {doc.sop_instance_uid} not in Orthanc"
            assert tags["SOPInstanceUID"] == doc.sop_instance_uid
            assert tags["StudyInstanceUID"] == study_uid[doc.study_id]
            assert tags["Modality"] == "SR"
            assert tags["SOPClassUID"] == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        print(
            f"{len(docs)} SRs in Orthanc ({len(latest)} latest) for {len(study_uid)} studies, "
            f"{len(studies)} with classified images"
        )
    finally:
        engine.dispose()

    # --- still serving; Ctrl-C stops everything with exit status 0 ----------------------------
    assert _echo(port) == SUCCESS
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 0, err_log.read_text()[-4000:]
