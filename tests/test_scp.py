"""The storage SCP over real associations on loopback.

Peers: dcmtk's ``echoscu``/``storescu`` and pynetdicom. Behind the SCP: a real database
(SQLite and PostgreSQL) and a real Redis broker fed by ``worker.queue.CeleryEnqueuer``.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import pynetdicom._config
import pytest
import redis as redis_lib
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, build_context
from pynetdicom.dsutils import encode_file_meta, split_dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ComputedRadiographyImageStorage,
    MRImageStorage,
    Verification,
)
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from db.models import Instance, InstanceStatus, Study
from db.repository import REFUSED_PREFIX, study_instances
from db.session import make_engine, make_session_factory
from dicom_node.contexts import (
    CANDIDATE_TRANSFER_SYNTAXES,
    LOSSY_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
)
from dicom_node.scp import StorageSCP, run_scp
from fracture_triage.messages import QUEUE, ClassifyInstance
from fracture_triage.settings import Settings
from fracture_triage.uids import is_valid_uid
from tests.conftest import REPO
from tests.databases import migrated
from tests.servers import RedisServer, free_port, wait_for_port
from tests.test_worker import _classified
from worker.queue import CeleryEnqueuer

pytestmark = pytest.mark.timeout(180)

SUCCESS = 0x0000
TINY_CR = "CR_cspine_MONO1_12b_16x16_tiny.dcm"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}  # Debian's dcmtk stalls 40 ms per PDU without


def dcmtk(name: str) -> str:
    """dcmtk's tool ``name``: pynetdicom installs Python apps with the same names (storescu,
    echoscu) that can shadow dcmtk's on PATH, so the dcmtk version banner is checked."""
    for candidate in (f"/usr/bin/{name}", f"/usr/local/bin/{name}", shutil.which(name)):
        if candidate and Path(candidate).exists():
            banner = subprocess.run(
                [candidate, "--version"], capture_output=True, text=True, check=False
            ).stdout
            if "dcmtk" in banner.lower():
                return candidate
    pytest.fail(f"dcmtk's {name} is not installed (apt-get install dcmtk)")


# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def db(database_url: str) -> Iterator[sessionmaker[Session]]:
    """The migrated database (SQLite and PostgreSQL)."""
    migrated(database_url)
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


@dataclass
class Broker:
    """The real Redis broker, the enqueue callable the SCP gets, and a look at the queue."""

    server: RedisServer
    enqueue: CeleryEnqueuer

    def messages(self) -> list[ClassifyInstance]:
        """Classify messages waiting in the queue (kombu keeps them as JSON in a list)."""
        client = redis_lib.Redis(port=self.server.port, db=SCP_TEST_REDIS_DB)
        try:
            raw = client.lrange(QUEUE, 0, -1)
        finally:
            client.close()
        out = []
        for item in raw:
            envelope = json.loads(item)
            assert envelope["headers"]["task"] == "worker.classify_instance"
            args, _kwargs, _embed = json.loads(base64.b64decode(envelope["body"]))
            out.append(ClassifyInstance.model_validate(args[0]))
        return out


#: A Redis database of its own on the shared test server: a Celery worker another test left
#: running on database 0 must not consume the messages these tests inspect.
SCP_TEST_REDIS_DB = 7


@pytest.fixture
def broker(redis: RedisServer) -> Iterator[Broker]:
    client = redis_lib.Redis(port=redis.port, db=SCP_TEST_REDIS_DB)
    client.flushdb()
    client.close()
    url = f"redis://127.0.0.1:{redis.port}/{SCP_TEST_REDIS_DB}"
    enqueuer = CeleryEnqueuer(Settings(broker_url=url))
    yield Broker(redis, enqueuer)
    enqueuer.close()


@contextmanager
def running_scp(
    tmp_path: Path, session_factory: sessionmaker[Session], enqueue: Any, **overrides: Any
) -> Iterator[StorageSCP]:
    settings = Settings(data_dir=tmp_path / "data", dicom_port=free_port(), **overrides)
    with StorageSCP(settings, session_factory, enqueue) as scp:
        yield scp


def instances(session_factory: sessionmaker[Session]) -> dict[str, Instance]:
    with session_factory() as session:
        return {i.sop_instance_uid: i for i in session.scalars(select(Instance)).all()}


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a DICOM file, without preamble and File Meta Information."""
    _meta, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def no_broker(msg: ClassifyInstance) -> None:
    raise ConnectionError("no broker in this test")


# --- association level -----------------------------------------------------------------------


@pytest.mark.slow  # dcmtk's echoscu
def test_echo_and_calling_ae_titles(tmp_path: Path, sqlite_db: sessionmaker[Session]) -> None:
    """C-ECHO works for an allowed calling AE; any other is refused with A-ASSOCIATE-RJ."""
    echoscu = dcmtk("echoscu")
    with running_scp(
        tmp_path, sqlite_db, no_broker, allowed_calling_aets=["MODALITY", "PACS"]
    ) as scp:
        port = str(scp.port)
        ok = subprocess.run(
            [echoscu, "-aet", "MODALITY", "-aec", "FXTRIAGE", "127.0.0.1", port],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert ok.returncode == 0, ok.stderr
        refused = subprocess.run(
            [echoscu, "-aet", "INTRUDER", "-aec", "FXTRIAGE", "127.0.0.1", port],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert refused.returncode != 0
        # PS3.8 9.3.4: rejected-permanent, source service-user, reason 3.
        assert "Rejected Permanent" in refused.stderr + refused.stdout
        assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout

        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == SUCCESS
        assoc.release()
        intruder = AE(ae_title="INTRUDER")
        intruder.add_requested_context(Verification)
        assert intruder.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE").is_rejected


def test_unknown_sop_class_is_refused_at_negotiation(
    tmp_path: Path, sqlite_db: sessionmaker[Session], dicom_samples: Path
) -> None:
    with running_scp(tmp_path, sqlite_db, no_broker) as scp:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(MRImageStorage)
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
        assert assoc.is_established
        [rejected] = assoc.rejected_contexts
        assert rejected.abstract_syntax == MRImageStorage
        assert rejected.result == 0x03  # abstract-syntax-not-supported (PS3.8 9.3.3.2)
        mr = pydicom.dcmread(dicom_samples / "BAD_MR_truncated_pixeldata.dcm")
        with pytest.raises(ValueError, match="presentation context"):
            assoc.send_c_store(mr)
        # The association and the node keep working.
        status = assoc.send_c_store(dicom_samples / TINY_CR)
        assert status.Status == SUCCESS
        assoc.release()
    assert set(instances(sqlite_db)) == {pydicom.dcmread(dicom_samples / TINY_CR).SOPInstanceUID}


def test_negotiation_never_asks_for_lossy_compression(
    tmp_path: Path, sqlite_db: sessionmaker[Session]
) -> None:
    """One context offering lossy and lossless syntaxes gets a lossless one; a lossy-only
    context is accepted as offered (the file is received in its own syntax)."""
    with running_scp(tmp_path, sqlite_db, no_broker) as scp:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(
            ComputedRadiographyImageStorage, ["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.70"]
        )
        ae.add_requested_context(
            ComputedRadiographyImageStorage, ["1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"]
        )
        ae.add_requested_context(ComputedRadiographyImageStorage, ["1.2.840.10008.1.2.4.50"])
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
        accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts]
        assoc.release()
    assert accepted == ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.50"]


# --- every sample file -----------------------------------------------------------------------

#: What the SCP answers to each sample sent by pynetdicom (file bytes as they are, where the
#: file has usable File Meta): "stored", or a failure status, or "not negotiated" (SOP class
#: refused at association, or a file without the UIDs an SCU needs to send it at all).
#: Files sharing a SOP Instance UID with one sent before are duplicates: Success, stored once.
NOT_SENT = "not negotiated"
EXPECTED = {
    "BAD_CR_chest_noPixelData_Carestream.dcm": 0xA900,  # Data Set does not match SOP Class
    "BAD_DX_extremity_noPixelData_VOILUTSeq_Agfa.dcm": 0xA900,
    "BAD_SC_declared46341x46341_tiny_pixeldata.dcm": 0xA900,  # Rows x Columns over the limit
    "DERIVED_BAD_CR_extremity_RG3_truncated_at60000.dcm": 0xC000,  # Cannot understand
    "BAD_MR_missing_Rows.dcm": NOT_SENT,  # no SOP Class UID
    "BAD_MR_truncated_pixeldata.dcm": NOT_SENT,  # MR Image Storage
    "BAD_RTDOSE_badVR_IS_value_1A.dcm": NOT_SENT,  # RT Dose Storage
    "BAD_meta_missing_TransferSyntaxUID.dcm": NOT_SENT,  # no SOP Class UID
    # The File Meta's Media Storage SOP Instance UID differs from the data set's: sent as is,
    # the command disagrees with the data set (0x0117 Invalid SOP Instance); see below.
    "CR_MONO1_10b_ModalityLUTSeq_JPEGLosslessSV1.dcm": 0x0117,
}
#: Stored, but known at once not to be classifiable (recorded failed, not queued).
UNCLASSIFIABLE = {"BAD_SC_rgb_jpeg_explicitVR_mixed_implicit.dcm": "grayscale"}


def _send_plan(path: Path) -> tuple[str | None, str | None, bool]:
    """(SOP class, transfer syntax, send the file's bytes as they are) for one sample."""
    try:
        meta, _offset = split_dataset(path)
    except InvalidDicomError:  # no preamble and no File Meta (a bare data set)
        meta = pydicom.Dataset()
    if "TransferSyntaxUID" in meta and "MediaStorageSOPClassUID" in meta:
        return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID), True
    ds = pydicom.dcmread(path, force=True)
    return (str(ds["SOPClassUID"].value) if "SOPClassUID" in ds else None), None, False


def with_file_meta(path: Path, folder: Path) -> Path:
    """A bare data set (no preamble, no File Meta) wrapped unchanged in File Meta Information
    for Implicit VR Little Endian, the transfer syntax a bare data set defaults to."""
    ds = pydicom.dcmread(path, force=True)
    meta = pydicom.dataset.FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ImplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out = folder / f"wrapped-{path.name}"
    out.write_bytes(b"\0" * 128 + b"DICM" + encode_file_meta(meta) + path.read_bytes())
    return out


def test_every_sample_file_from_pynetdicom(
    tmp_path: Path,
    db: sessionmaker[Session],
    broker: Broker,
    dicom_samples: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each sample is stored, refused with a failure status, or refused at negotiation; files
    on disk hold exactly the bytes sent; each new instance is queued once; the node serves on."""
    # Send each file's data set bytes as they are, not decoded and re-encoded by pydicom.
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    files = sorted(dicom_samples.glob("*.dcm"))
    assert len(files) >= 40
    plans = {p.name: _send_plan(p) for p in files}
    ae = AE(ae_title="MODALITY")
    ae.maximum_pdu_size = 131072
    contexts = {(sop, ts) for sop, ts, _raw in plans.values() if sop and ts}
    contexts |= {(sop, str(ImplicitVRLittleEndian)) for sop in STORAGE_SOP_CLASSES}
    ae.requested_contexts = [build_context(sop, ts) for sop, ts in sorted(contexts)]
    ae.add_requested_context(Verification)

    statuses: dict[str, int | str] = {}
    first_sender: dict[str, str] = {}  # SOP Instance UID -> first file sent with it
    with running_scp(tmp_path, db, broker.enqueue) as scp:
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
        assert assoc.is_established
        started = time.monotonic()
        for path in files:
            sop, _ts, raw = plans[path.name]
            if sop not in STORAGE_SOP_CLASSES:
                statuses[path.name] = NOT_SENT
                continue
            rsp = assoc.send_c_store(path if raw else with_file_meta(path, tmp_path))
            assert "Status" in rsp, f"{path.name}: no response"
            statuses[path.name] = int(rsp.Status)
            if rsp.Status == SUCCESS:
                uid = pydicom.dcmread(path, force=True).SOPInstanceUID
                first_sender.setdefault(uid, path.name)
            else:  # a failure status always comes with an Error Comment (the reason)
                assert rsp.get("ErrorComment"), path.name
        # The command/data-set mismatch resent the way most SCUs send (UIDs from the data set):
        # its SOP Instance UID has a leading-zero component ("01"), which the SR could not
        # reference, so it is refused too (0x0117, PS3.5 9.1) rather than stored half-usable.
        lut = dicom_samples / "CR_MONO1_10b_ModalityLUTSeq_JPEGLosslessSV1.dcm"
        rsp = assoc.send_c_store(pydicom.dcmread(lut))
        assert rsp.Status == 0x0117 and "PS3.5 9.1" in rsp.ErrorComment
        elapsed = time.monotonic() - started
        assert assoc.send_c_echo().Status == SUCCESS  # still serving after every bad file
        assoc.release()
    print(f"sent {len(files)} files in {elapsed:.1f} s")

    for name, expected in {**EXPECTED}.items():
        assert statuses[name] == expected, name
    for name, status in statuses.items():
        if name not in EXPECTED:
            assert status == SUCCESS, f"{name}: 0x{status:04X}"

    stored = instances(db)
    accepted = {uid: name for uid, name in first_sender.items()}
    refused_with_uids = {
        pydicom.dcmread(dicom_samples / n).SOPInstanceUID: n
        for n, s in EXPECTED.items()
        if isinstance(s, int) and s == 0xA900
    }
    assert set(stored) == set(accepted) | set(refused_with_uids)
    for uid, name in refused_with_uids.items():
        assert stored[uid].status == InstanceStatus.failed
        assert (stored[uid].failure_reason or "").startswith(REFUSED_PREFIX), name
        assert Path(stored[uid].storage_path).is_file()  # kept for the administrator

    for uid, name in accepted.items():
        instance = stored[uid]
        path = Path(instance.storage_path)
        assert path.is_relative_to(tmp_path / "data" / "objects")
        assert path.name == f"{uid}.dcm"
        if name in UNCLASSIFIABLE:
            assert instance.status == InstanceStatus.failed
            assert UNCLASSIFIABLE[name] in (instance.failure_reason or "")
            continue
        assert instance.status == InstanceStatus.queued, name
        if name.endswith("(data set)"):
            assert pydicom.dcmread(path).SOPInstanceUID == uid
        elif not plans[name][2]:
            assert dataset_bytes(path) == (dicom_samples / name).read_bytes(), name
        else:  # stored as received: the data set bytes are those of the file sent
            assert dataset_bytes(path) == dataset_bytes(dicom_samples / name), name
            meta = pydicom.dcmread(path, stop_before_pixels=True).file_meta
            assert meta.TransferSyntaxUID == plans[name][1]
            assert meta.MediaStorageSOPInstanceUID == uid
            assert str(meta.SourceApplicationEntityTitle).strip() == "MODALITY"

    messages = broker.messages()
    queued = {u: i for u, i in stored.items() if i.status == InstanceStatus.queued}
    assert sorted(m.sop_instance_uid for m in messages) == sorted(queued)  # each exactly once
    for msg in messages:
        assert msg.instance_id == queued[msg.sop_instance_uid].id  # the path is the row's
    assert not list((tmp_path / "data" / "objects").rglob(".incoming-*"))


def _storescu_config(path: Path) -> Path:
    """A storescu configuration proposing every (SOP class, transfer syntax) pair the node
    accepts, one presentation context each, plus RT Dose (refused by the node)."""
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(CANDIDATE_TRANSFER_SYNTAXES):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[[PresentationContexts]]", "[Contexts]"]
    n = 0
    for sop in [*STORAGE_SOP_CLASSES, "1.2.840.10008.5.1.4.1.1.481.2"]:
        for i in range(len(CANDIDATE_TRANSFER_SYNTAXES)):
            n += 1
            lines.append(f"PresentationContext{n} = {sop}\\TS{i}")
    assert n <= 128  # PS3.8 9.3.2.2: at most 128 presentation contexts
    lines += ["[[Profiles]]", "[All]", "PresentationContexts = Contexts"]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow  # dcmtk's storescu
def test_every_sample_file_from_dcmtk_storescu(
    tmp_path: Path, db: sessionmaker[Session], broker: Broker, dicom_samples: Path
) -> None:
    """dcmtk storescu, one association, every transfer syntax proposed as its own context."""
    storescu = dcmtk("storescu")
    config = _storescu_config(tmp_path / "storescu.cfg")
    with running_scp(tmp_path, db, broker.enqueue) as scp:
        started = time.monotonic()
        run = subprocess.run(
            [storescu, "-v", "-xf", str(config), "All", "-nh", "+sd", "-aet", "MODALITY",
             "-aec", "FXTRIAGE", "--max-pdu", "131072", "127.0.0.1", str(scp.port),
             str(dicom_samples)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        assert run.returncode == 0, run.stderr[-2000:]
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
        assert assoc.send_c_echo().Status == SUCCESS  # still serving
        assoc.release()
    print(f"storescu sent the samples in {elapsed:.1f} s")
    output = run.stdout + run.stderr
    assert "No presentation context for: (RD)" in output  # RT Dose refused at negotiation

    expected_stored: set[str] = set()
    expected_refused: set[str] = set()
    for path in sorted(dicom_samples.glob("*.dcm")):
        if path.name.startswith(("BAD_", "DERIVED_BAD_")):
            continue
        uid = pydicom.dcmread(path, force=True).SOPInstanceUID
        # A leading-zero component ("01") breaks PS3.5 9.1: refused, not stored.
        (expected_stored if is_valid_uid(uid) else expected_refused).add(uid)
    stored = instances(db)
    assert expected_refused and not expected_refused & set(stored)
    assert expected_stored <= set(stored)
    for uid in expected_stored:
        assert stored[uid].status == InstanceStatus.queued
        assert pydicom.dcmread(stored[uid].storage_path).SOPInstanceUID == uid
    for name in ("BAD_CR_chest_noPixelData_Carestream.dcm",
                 "BAD_SC_declared46341x46341_tiny_pixeldata.dcm"):  # fmt: skip
        uid = pydicom.dcmread(dicom_samples / name).SOPInstanceUID
        assert stored[uid].status == InstanceStatus.failed
        assert "0xA900" in (stored[uid].failure_reason or "")
    queued = sorted(u for u, i in stored.items() if i.status == InstanceStatus.queued)
    assert sorted(m.sop_instance_uid for m in broker.messages()) == queued


@pytest.mark.slow  # dcmtk's dcmsend
def test_dcmsend_with_each_files_own_transfer_syntax(
    tmp_path: Path, sqlite_db: sessionmaker[Session], broker: Broker, dicom_samples: Path
) -> None:
    """dcmtk dcmsend (the simplest command for users: it proposes each file's own transfer
    syntax) stores every compressed and uncompressed radiograph of the samples."""
    compressed = {
        "CR_MONO1_8b_JPEGBaseline_KonicaMinolta.dcm",
        "DERIVED_CR_extremity_RG3_MONO1_10b_JPEGExtended_lossy_SeFixed.dcm",
        "DERIVED_CR_chest_MONO1_10b_440_JPEGLossless_P14_SV6.dcm",
        "CR_hip_RG2_MONO2_10b_JPEGLosslessSV1.dcm",
        "CR_extremity_RG3_MONO1_10b_JPEGLS_lossless.dcm",
        "CR_chest_RG1_MONO1_15b_odd1955x1841_JPEGLS_nearlossless.dcm",
        "DX_chest_MONO2_16b_J2K_lossless_0Padding.dcm",
        "CR_extremity_RG3_MONO1_10b_J2K_lossy.dcm",
        "CR_hip_RG2_MONO2_10b_RLE.dcm",
        "SC_OT_MONO2_8b_Deflated_dclunie.dcm",
    }
    folder = tmp_path / "study"
    folder.mkdir()
    for name in compressed:  # links, not copies: the shared samples stay where they are
        (folder / name).symlink_to(dicom_samples / name)
    with running_scp(tmp_path, sqlite_db, broker.enqueue) as scp:
        run = subprocess.run(
            [dcmtk("dcmsend"), "-aet", "MODALITY", "-aec", "FXTRIAGE", "+sd", "127.0.0.1",
             str(scp.port), str(folder)],
            env=DCMTK_ENV, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    stored = instances(sqlite_db)
    for name in compressed:
        ds = pydicom.dcmread(dicom_samples / name, stop_before_pixels=True)
        instance = stored[ds.SOPInstanceUID]
        original = ds.file_meta.TransferSyntaxUID
        # dcmsend also proposes Explicit VR Little Endian for losslessly compressed files; the
        # node prefers uncompressed syntaxes, then lossless, then lossy ones, so an SCU is never
        # made to compress lossily, and a lossy file arrives in its own syntax.
        if original in LOSSY_TRANSFER_SYNTAXES:
            assert instance.transfer_syntax_uid == original, name
        else:
            assert instance.transfer_syntax_uid in (original, ExplicitVRLittleEndian), name
        assert instance.status == InstanceStatus.queued
    assert len(broker.messages()) == len(compressed)


# --- duplicates, broker and database failures ------------------------------------------------


@pytest.mark.slow  # dcmtk's storescu
def test_duplicate_is_stored_once_and_queued_once(
    tmp_path: Path, db: sessionmaker[Session], broker: Broker, dicom_samples: Path
) -> None:
    """The same instance from dcmtk twice, then from four associations at the same moment."""
    storescu = dcmtk("storescu")
    sample = dicom_samples / TINY_CR
    uid = pydicom.dcmread(sample).SOPInstanceUID
    with running_scp(tmp_path, db, broker.enqueue) as scp:
        cmd = [storescu, "-aet", "MODALITY", "-aec", "FXTRIAGE", "127.0.0.1", str(scp.port)]
        cmd.append(str(sample))
        subprocess.run(cmd, env=DCMTK_ENV, check=True, timeout=30)
        stored_path = Path(instances(db)[uid].storage_path)
        before = stored_path.stat()
        subprocess.run(cmd, env=DCMTK_ENV, check=True, timeout=30)

        results: list[int] = []
        barrier = threading.Barrier(4)

        def send() -> None:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(ComputedRadiographyImageStorage)
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
            barrier.wait()
            results.append(int(assoc.send_c_store(sample).Status))
            assoc.release()

        threads = [threading.Thread(target=send) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert results == [SUCCESS] * 4
    assert list(instances(db)) == [uid]
    after = stored_path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # untouched
    assert [m.sop_instance_uid for m in broker.messages()] == [uid]


@pytest.mark.parametrize("policy", ["keep-first", "keep-newest"])
def test_a_conflicting_resend_is_logged_recorded_and_handled_by_the_policy(
    tmp_path: Path,
    db: sessionmaker[Session],
    broker: Broker,
    dicom_samples: Path,
    caplog: Any,
    policy: str,
) -> None:
    """The same SOP Instance UID with other pixels, over a real association: Success (as for
    any duplicate), a warning naming the UID, and the conflict counted on the instance with
    its time and digest. keep-first keeps the stored file and its result; keep-newest
    replaces the file, drops the result and queues the instance again."""
    from db.models import Result
    from dicom_node.storage import stored_dataset_sha256

    original = pydicom.dcmread(dicom_samples / TINY_CR)
    changed = pydicom.dcmread(dicom_samples / TINY_CR)
    changed.PixelData = (4095 - changed.pixel_array).astype("<u2").tobytes()
    uid = original.SOPInstanceUID
    with (
        caplog.at_level(logging.INFO, logger="dicom_node"),
        running_scp(tmp_path, db, broker.enqueue, duplicate_policy=policy) as scp,
    ):
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
        assert assoc.send_c_store(original).Status == SUCCESS
        first = instances(db)[uid]
        stored_path = Path(first.storage_path)
        assert first.content_sha256 == stored_dataset_sha256(stored_path)
        assert first.conflicting_resends == 0
        _classified(db, first.id)  # as the worker would
        before = stored_path.stat()

        assert assoc.send_c_store(changed).Status == SUCCESS
        kept = changed if policy == "keep-newest" else original
        assert pydicom.dcmread(stored_path).PixelData == kept.PixelData
        assert assoc.send_c_store(original).Status == SUCCESS  # the first content again
        assoc.release()

    record = instances(db)[uid]
    with db() as session:
        results = session.scalars(select(Result).where(Result.instance_id == record.id)).all()
    assert "conflicting re-send of " + uid in caplog.text
    assert f"duplicate policy {policy}" in caplog.text
    assert record.last_conflict_at is not None
    assert record.last_conflict_sha256 and len(record.last_conflict_sha256) == 64
    if policy == "keep-first":
        # The changed copy conflicts; the original again is a plain duplicate.
        assert record.conflicting_resends == 1
        assert record.last_conflict_sha256 != record.content_sha256 == first.content_sha256
        after = stored_path.stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
        assert record.status == InstanceStatus.done and len(results) == 1
        assert [m.sop_instance_uid for m in broker.messages()] == [uid]
    else:
        # Both re-sends conflict with what was stored at the time; the last one stands.
        assert record.conflicting_resends == 2
        assert record.content_sha256 == first.content_sha256 == stored_dataset_sha256(stored_path)
        assert record.last_conflict_sha256 == first.content_sha256
        assert record.status == InstanceStatus.queued and results == []
        assert [m.sop_instance_uid for m in broker.messages()] == [uid, uid, uid]
        assert not list(stored_path.parent.glob(".incoming-*"))
    for identifier in (original.PatientName, original.PatientID):
        if str(identifier):
            assert str(identifier) not in caplog.text


def test_same_instance_in_two_concurrent_fresh_stores(
    tmp_path: Path, db: sessionmaker[Session], broker: Broker, dicom_samples: Path
) -> None:
    """Eight associations race to store a new instance: one record, one message, all Success."""
    sample = dicom_samples / "DX_ForProcessing_GE_XR220_MONO1_8b_2x2px.dcm"
    uid = pydicom.dcmread(sample).SOPInstanceUID
    results: list[int] = []
    with running_scp(tmp_path, db, broker.enqueue) as scp:
        barrier = threading.Barrier(8)

        def send() -> None:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(str(pydicom.dcmread(sample).SOPClassUID))
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
            barrier.wait()
            results.append(int(assoc.send_c_store(sample).Status))
            assoc.release()

        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    assert results == [SUCCESS] * 8
    assert list(instances(db)) == [uid]
    assert [m.sop_instance_uid for m in broker.messages()] == [uid]


@pytest.mark.slow  # starts and stops redis-server
def test_broker_down_still_stores_and_acknowledges(
    tmp_path: Path, db: sessionmaker[Session], dicom_samples: Path
) -> None:
    """Redis stopped mid-run: the instance is stored, acknowledged and left pending; once Redis
    is back the next instance is queued again."""
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    enqueuer = CeleryEnqueuer(Settings(broker_url=redis.url))
    samples = [
        dicom_samples / "DX_ForProcessing_GE_XR220_MONO1_8b_2x2px.dcm",
        dicom_samples / "DX_ForProcessing_GE_XR220_MONO1_10b_2x2px.dcm",
        dicom_samples / TINY_CR,
    ]
    uids = [pydicom.dcmread(p).SOPInstanceUID for p in samples]
    try:
        with running_scp(tmp_path, db, enqueuer) as scp:
            ae = AE(ae_title="MODALITY")
            for sample in samples:
                ae.add_requested_context(str(pydicom.dcmread(sample).SOPClassUID))

            def store(path: Path) -> tuple[int, float]:
                assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
                t0 = time.monotonic()
                status = int(assoc.send_c_store(path).Status)
                assoc.release()
                return status, time.monotonic() - t0

            assert store(samples[0])[0] == SUCCESS
            redis.stop()
            status, seconds = store(samples[1])
            assert status == SUCCESS
            assert seconds < 15  # the enqueue fails fast instead of stalling the modality
            print(f"C-STORE with the broker down answered in {seconds:.2f} s")
            redis.start()
            assert store(samples[2])[0] == SUCCESS
        stored = instances(db)
        assert [stored[u].status for u in uids] == [
            InstanceStatus.queued,
            InstanceStatus.pending,
            InstanceStatus.queued,
        ]
        assert Path(stored[uids[1]].storage_path).is_file()
    finally:
        enqueuer.close()
        redis.stop()


def test_database_failure_answers_out_of_resources(
    tmp_path: Path, database_url: str, broker: Broker, dicom_samples: Path, caplog: Any
) -> None:
    """No schema in the database: refused with 0xA700 (the peer retries), nothing queued."""
    engine = make_engine(database_url)  # deliberately not migrated
    try:
        with running_scp(tmp_path, make_session_factory(engine), broker.enqueue) as scp:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(ComputedRadiographyImageStorage)
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
            rsp = assoc.send_c_store(dicom_samples / TINY_CR)
            assoc.release()
    finally:
        engine.dispose()
    assert rsp.Status == 0xA700  # Refused: Out of Resources
    assert "database" in rsp.ErrorComment
    assert broker.messages() == []
    assert "database unavailable" in caplog.text


def test_storage_failure_answers_out_of_resources(
    tmp_path: Path, sqlite_db: sessionmaker[Session], broker: Broker, dicom_samples: Path
) -> None:
    """The object cannot be written: 0xA700 (the peer retries later), no record, no message."""
    sample = pydicom.dcmread(dicom_samples / TINY_CR)
    with running_scp(tmp_path, sqlite_db, broker.enqueue) as scp:
        # A file where the study's folder should be: creating the folder fails (root ignores
        # permissions, so a read-only folder would not do).
        (scp.settings.storage_dir / sample.StudyInstanceUID).write_bytes(b"")
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
        rsp = assoc.send_c_store(dicom_samples / TINY_CR)
        assoc.release()
    assert rsp.Status == 0xA700  # Refused: Out of Resources
    assert "storage" in rsp.ErrorComment
    assert instances(sqlite_db) == {}
    assert broker.messages() == []


def test_refused_object_is_recorded_and_a_corrected_resend_is_stored(
    tmp_path: Path, db: sessionmaker[Session], broker: Broker, dicom_samples: Path, caplog: Any
) -> None:
    """A refused object leaves its reason in the log and the database (no patient data in the
    log); the corrected object sent later under the same SOP Instance UID is stored normally."""
    original = pydicom.dcmread(dicom_samples / TINY_CR)
    broken = pydicom.dcmread(dicom_samples / TINY_CR)
    del broken.PixelData
    with running_scp(tmp_path, db, broker.enqueue) as scp:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
        rsp = assoc.send_c_store(broken)
        assert rsp.Status == 0xA900  # Data Set does not match SOP Class
        assert "Pixel Data" in rsp.ErrorComment
        record = instances(db)[original.SOPInstanceUID]
        assert record.status == InstanceStatus.failed
        assert (record.failure_reason or "").startswith(REFUSED_PREFIX)
        assert "Pixel Data (7FE0,0010) is missing" in (record.failure_reason or "")
        assert broker.messages() == []

        assert assoc.send_c_store(original).Status == SUCCESS
        assoc.release()
    record = instances(db)[original.SOPInstanceUID]
    assert record.status == InstanceStatus.queued
    assert record.failure_reason is None
    assert pydicom.dcmread(record.storage_path).PixelData == original.PixelData
    assert [m.instance_id for m in broker.messages()] == [record.id]
    assert "Pixel Data (7FE0,0010) is missing" in caplog.text
    for identifier in (original.PatientName, original.PatientID):
        if str(identifier):
            assert str(identifier) not in caplog.text


# --- identity: a series belongs to one study, a study to one patient ------------------------


def other_patients_image(
    sample: Path, n: int, *, study: str | None = None, series: str | None = None
) -> pydicom.Dataset:
    """The sample as another patient's image: its own SOP Instance UID and Patient, and the
    given Study (a new one unless named) and Series Instance UIDs (the sample's unless named)."""
    ds = pydicom.dcmread(sample)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study or generate_uid()
    ds.SeriesInstanceUID = series or ds.SeriesInstanceUID
    ds.PatientID = f"OTHER-PATIENT-{n}"
    ds.PatientName = f"Other^Patient{n}"
    return ds


def stored_files(scp: StorageSCP) -> set[str]:
    return {p.name for p in scp.settings.storage_dir.rglob("*") if p.is_file()}


def study_sops(session_factory: sessionmaker[Session], study_uid: str) -> list[str]:
    with session_factory() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        return [i.sop_instance_uid for i in study_instances(session, study.id)]


def test_image_reusing_another_studys_series_uid_is_refused(
    tmp_path: Path, db: sessionmaker[Session], dicom_samples: Path, caplog: Any
) -> None:
    """Patient B's image, its own Study Instance UID, reusing the Series Instance UID of
    patient A's study: refused with 0xC001 and an Error Comment naming the conflict; A's study
    keeps exactly its own instance, B's study is not recorded, nothing of B is on disk, and the
    log names the UIDs but no patient. The same for an image naming A's study with another
    Patient ID."""
    caplog.set_level(logging.INFO)
    a = pydicom.dcmread(dicom_samples / TINY_CR)
    b = other_patients_image(dicom_samples / TINY_CR, 1)
    c = other_patients_image(dicom_samples / TINY_CR, 2, study=a.StudyInstanceUID)
    c.SeriesInstanceUID = generate_uid()
    with running_scp(tmp_path, db, no_broker) as scp:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
        assert assoc.send_c_store(a).Status == SUCCESS
        rsp_b = assoc.send_c_store(b)
        rsp_c = assoc.send_c_store(c)
        assoc.release()
        files = stored_files(scp)
    assert rsp_b.Status == 0xC001  # Error: Cannot understand (C000-CFFF): identity conflict
    assert rsp_b.ErrorComment == "Series Instance UID belongs to another Study Instance UID"
    assert rsp_c.Status == 0xC001
    assert rsp_c.ErrorComment == "Study Instance UID is stored with another Patient ID"
    assert list(instances(db)) == [a.SOPInstanceUID]
    assert study_sops(db, a.StudyInstanceUID) == [a.SOPInstanceUID]
    with db() as session:
        assert session.scalars(select(Study.study_instance_uid)).all() == [a.StudyInstanceUID]
    assert files == {f"{a.SOPInstanceUID}.dcm"}  # nothing kept of B or C, not even refused
    assert b.StudyInstanceUID in caplog.text and a.StudyInstanceUID in caplog.text
    assert a.SeriesInstanceUID in caplog.text and b.SOPInstanceUID in caplog.text
    for ds in (a, b, c):
        for identifier in (ds.PatientName, ds.PatientID):
            if str(identifier):
                assert str(identifier) not in caplog.text


def test_concurrent_studies_claiming_one_new_series_only_one_is_stored(
    tmp_path: Path, sqlite_db: sessionmaker[Session], dicom_samples: Path
) -> None:
    """Six associations at once, three images of each of two studies naming one new series:
    the images of one study are stored, those of the other refused, and only the stored
    images are on disk (a refusal that lost the race after writing removes its file)."""
    series = generate_uid()
    studies = (generate_uid(), generate_uid())
    images = [
        other_patients_image(dicom_samples / TINY_CR, k % 2, study=studies[k % 2], series=series)
        for k in range(6)
    ]
    results: dict[str, int] = {}
    with running_scp(tmp_path, sqlite_db, no_broker) as scp:
        barrier = threading.Barrier(len(images))

        def send(ds: pydicom.Dataset) -> None:
            ae = AE(ae_title="MODALITY")
            ae.add_requested_context(ComputedRadiographyImageStorage)
            assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
            barrier.wait()
            results[ds.SOPInstanceUID] = int(assoc.send_c_store(ds).Status)
            assoc.release()

        threads = [threading.Thread(target=send, args=(ds,)) for ds in images]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        files = stored_files(scp)
    stored = {ds.StudyInstanceUID for ds in images if results[ds.SOPInstanceUID] == SUCCESS}
    assert len(stored) == 1
    (winner,) = stored
    for ds in images:
        assert results[ds.SOPInstanceUID] == (SUCCESS if ds.StudyInstanceUID == winner else 0xC001)
    won = sorted(ds.SOPInstanceUID for ds in images if ds.StudyInstanceUID == winner)
    assert sorted(instances(sqlite_db)) == won
    assert sorted(study_sops(sqlite_db, winner)) == won
    assert files == {f"{uid}.dcm" for uid in won}


def test_start_removes_temporary_files_left_by_a_crash(
    tmp_path: Path, sqlite_db: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """Temporary files of writes a crash cut short (never acknowledged) go at start-up;
    objects, and a temporary file another process may be writing now, stay."""
    storage_dir = Settings(data_dir=tmp_path / "data").storage_dir
    series = storage_dir / "1.2.3" / "1.2.3.5"
    stale = [series / ".incoming-abc123.tmp", storage_dir / "rejected" / ".incoming-x.tmp"]
    kept = [series / "1.2.3.4.dcm", series / ".incoming-now.tmp", series / "incoming-1.tmp"]
    hour_ago = time.time() - 3600
    for path in [*stale, *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"partial")
        if path.name != ".incoming-now.tmp":
            os.utime(path, (hour_ago, hour_ago))
    with (
        caplog.at_level(logging.WARNING, logger="dicom_node.scp"),
        running_scp(tmp_path, sqlite_db, no_broker),
    ):
        pass
    assert [p for p in stale if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert "removed 2 temporary file(s)" in caplog.text


#: A writer that dies (SIGKILL, as the OOM killer or a power cut would) halfway through
#: write_atomic, or one that stays inside it until its standard input closes.
_CRASHING_WRITER = """
import os, signal, sys
from pathlib import Path
from fracture_triage.files import write_atomic

def chunks():
    yield b"partial object"
    if sys.argv[2] == "crash":
        os.kill(os.getpid(), signal.SIGKILL)
    print("writing", flush=True)
    sys.stdin.read()
    yield b"rest"

write_atomic(Path(sys.argv[1]), chunks())
"""


def test_start_removes_a_crashed_writers_fresh_temporary_but_not_a_live_ones(
    tmp_path: Path, sqlite_db: sessionmaker[Session], caplog: pytest.LogCaptureFixture
) -> None:
    """A node killed mid-write and restarted at once (well within the 60 s age rule) finds
    its temporary file gone at start-up: the file names its writer, whose pid no longer
    runs. A live writer's temporary in the same folder (another node process sharing it)
    and a fresh one from another host stay."""
    storage_dir = Settings(data_dir=tmp_path / "data").storage_dir
    series = storage_dir / "1.2.3" / "1.2.3.5"
    series.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    crashed = subprocess.run(
        [sys.executable, "-c", _CRASHING_WRITER, str(series / "1.2.3.4.dcm"), "crash"],
        env=env,
        timeout=60,
    )
    assert crashed.returncode == -signal.SIGKILL
    orphans = list(series.glob(".incoming-*.tmp"))
    assert len(orphans) == 1  # its content still in the dead process's buffer
    live = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_WRITER, str(series / "1.2.3.6.dcm"), "live"],
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert live.stdout is not None and live.stdout.readline() == b"writing\n"
        writing = [p for p in series.glob(".incoming-*.tmp") if p not in orphans]
        assert len(writing) == 1
        other_host = series / ".incoming-00000000.00000000.1.abcdefgh.tmp"
        other_host.write_bytes(b"another host's write in progress")
        with (
            caplog.at_level(logging.WARNING, logger="dicom_node.scp"),
            running_scp(tmp_path, sqlite_db, no_broker),
        ):
            pass
        assert not orphans[0].exists()
        assert writing[0].exists() and other_host.exists()
        assert "removed 1 temporary file(s)" in caplog.text
    finally:
        assert live.stdin is not None
        live.stdin.close()
        live.wait(timeout=30)
    assert live.returncode == 0 and (series / "1.2.3.6.dcm").read_bytes() == b"partial objectrest"


def test_a_temporary_this_process_is_writing_is_kept_by_its_own_sweep(tmp_path: Path) -> None:
    """The same process's writer: kept while write_atomic runs, removed once orphaned."""
    from dicom_node.storage import remove_stale_temporaries
    from fracture_triage.files import temporary_prefix, write_atomic, writer_keys

    started, release = threading.Event(), threading.Event()

    def chunks() -> Iterator[bytes]:
        yield b"partial"
        started.set()
        release.wait(30)
        yield b"rest"

    target = tmp_path / "a" / "1.2.3.dcm"
    writer = threading.Thread(target=write_atomic, args=(target, chunks()))
    writer.start()
    try:
        assert started.wait(30)
        assert remove_stale_temporaries(tmp_path) == 0
    finally:
        release.set()
        writer.join(30)
    assert target.read_bytes() == b"partialrest"
    orphan = target.parent / f"{temporary_prefix()}abcdefgh.tmp"  # ours, not being written
    # This host in another boot or PID namespace (a restarted container): its writers are gone.
    host, space = writer_keys()
    other_space = "0" * 8 if space != "0" * 8 else "1" * 8
    restarted = target.parent / f".incoming-{host}.{other_space}.{os.getpid()}.abcdefgh.tmp"
    for path in (orphan, restarted):
        path.write_bytes(b"partial")
    assert remove_stale_temporaries(tmp_path) == 2
    assert not orphan.exists() and not restarted.exists()


# --- the role's entry point ------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.slow  # the SCP in a subprocess, dcmtk's echoscu
def test_run_scp_stops_cleanly(tmp_path: Path, sig: signal.Signals) -> None:
    """``run_scp`` serves until Ctrl-C (SIGINT) or SIGTERM, then exits 0 and frees the port."""
    port = free_port()
    env = {
        **os.environ,
        "FRACTURE_TRIAGE_DATA_DIR": str(tmp_path / "data"),
        "FRACTURE_TRIAGE_DICOM_PORT": str(port),
    }
    code = (
        "from dicom_node.scp import run_scp\n"
        "from fracture_triage.settings import Settings\n"
        "def enqueue(msg):\n    raise ConnectionError('no broker')\n"
        "run_scp(Settings(), enqueue)\n"
        "print('stopped cleanly', flush=True)\n"
    )
    # Started the way a shell starts a background job: SIGINT ignored. Ctrl-C must work anyway.
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    try:
        wait_for_port(port, timeout=60, proc=proc)
        run = subprocess.run(
            [dcmtk("echoscu"), "-aec", "FXTRIAGE", "127.0.0.1", str(port)],
            env=DCMTK_ENV,
            timeout=30,
            check=False,
        )
        assert run.returncode == 0
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "stopped cleanly" in out
    with pytest.raises(TimeoutError):
        wait_for_port(port, timeout=0.5)


def test_run_scp_in_a_thread_stops_on_its_event(
    tmp_path: Path, sqlite_db: sessionmaker[Session]
) -> None:
    """How ``fracture-triage up`` runs the role: a thread, ``ready`` and ``stop`` events."""
    settings = Settings(data_dir=tmp_path / "data", dicom_port=free_port())
    ready, stop = threading.Event(), threading.Event()
    thread = threading.Thread(
        target=run_scp,
        args=(settings, no_broker),
        kwargs={"session_factory": sqlite_db, "ready": ready, "stop": stop},
    )
    thread.start()
    try:
        assert ready.wait(30)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", settings.dicom_port, ae_title="FXTRIAGE")
        assert assoc.send_c_echo().Status == SUCCESS
        assoc.release()
    finally:
        stop.set()
        thread.join(20)
    assert not thread.is_alive()
    with pytest.raises(TimeoutError):
        wait_for_port(settings.dicom_port, timeout=0.5)
