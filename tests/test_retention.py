"""Retention (``fracture_triage.retention``, ``fracture-triage purge [--dry-run]``): objects
received by the real SCP are deleted only once their study's SR was delivered long enough
ago; rows stay, marked purged."""

from __future__ import annotations

import os
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from sqlalchemy import select, update

from db.migrations import upgrade
from db.models import Instance, InstanceStatus, SendStatus, Series, SRDocument, Study
from db.repository import utcnow
from db.session import make_engine, make_session_factory
from tests.conftest import require
from tests.test_cli_results import cli
from tests.test_scp_hostile import running_scp

TINY = "CR_cspine_MONO1_12b_16x16_tiny.dcm"


def store(port: int, sample: Path, study_uid: str) -> str:
    ds = pydicom.dcmread(sample)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FXTRIAGE")
    assert assoc.is_established
    assert int(assoc.send_c_store(ds).Status) == 0x0000
    assoc.release()
    return str(ds.SOPInstanceUID)


def purge(data_dir: Path, *args: str) -> str:
    env = {
        **os.environ,
        "FRACTURE_TRIAGE_DATA_DIR": str(data_dir),
        "FRACTURE_TRIAGE_RETENTION_DAYS": "30",
        "FRACTURE_TRIAGE_SR_RETENTION_DAYS": "30",
    }
    run = subprocess.run(
        [*cli(), "purge", *args], env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.slow  # runs the SCP
def test_purge_deletes_only_what_was_delivered_long_enough_ago(
    tmp_path: Path, dicom_samples: Path
) -> None:
    sample = require(dicom_samples / TINY)
    data_dir = tmp_path / "data"
    url = f"sqlite:///{data_dir / 'triage.db'}"
    data_dir.mkdir()
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    a, b, c = generate_uid(), generate_uid(), generate_uid()
    with running_scp(tmp_path, sessions) as scp:
        a1, a2 = store(scp.port, sample, a), store(scp.port, sample, a)
        b1, c1 = store(scp.port, sample, b), store(scp.port, sample, c)
    now = utcnow()
    days = lambda n: now - timedelta(days=n)  # noqa: E731
    sr_dir = data_dir / "sr"
    sr_dir.mkdir()

    with sessions() as session:
        ids = {s.study_instance_uid: s.id for s in session.scalars(select(Study))}
        session.execute(update(Instance).values(status=InstanceStatus.done, received_at=days(41)))
        # a2 arrived after study A's SR: not covered by it.
        session.execute(
            update(Instance).where(Instance.sop_instance_uid == a2).values(received_at=days(10))
        )
        # A: sent 40 days ago. B: still pending. C: sent 5 days ago.
        for uid, status, created in (
            (a, SendStatus.sent, 40),
            (b, SendStatus.pending, 40),
            (c, SendStatus.sent, 5),
        ):
            path = sr_dir / f"{uid}.dcm"
            path.write_bytes(b"SR")
            session.add(
                SRDocument(
                    study_id=ids[uid],
                    study_revision=1,
                    sop_instance_uid=generate_uid(),
                    series_instance_uid=generate_uid(),
                    path=str(path),
                    created_at=days(created),
                    fracture=False,
                    probability=0.1,
                    instance_count=1,
                    send_status=status,
                    send_attempts=1,
                    sent_at=days(created) if status == SendStatus.sent else None,
                )
            )
        session.commit()
        paths = {
            i.sop_instance_uid: Path(i.storage_path) for i in session.scalars(select(Instance))
        }
    # A refused object nobody could record, 60 days old.
    rejected = data_dir / "objects" / "rejected"
    rejected.mkdir()
    orphan = rejected / "0123abcd.dcm"
    orphan.write_bytes(b"\x00" * 1000)
    old = time.time() - 60 * 86400
    os.utime(orphan, (old, old))

    dry = purge(data_dir, "--dry-run")
    assert "would purge 1 received object(s) of 1 study(ies), 1 refused object file(s)" in dry
    assert "and 1 SR file(s)" in dry
    assert all(p.exists() for p in paths.values()) and orphan.exists()

    done = purge(data_dir)
    assert "purged 1 received object(s) of 1 study(ies), 1 refused object file(s)" in done
    assert not paths[a1].exists() and not orphan.exists()
    assert all(paths[uid].exists() for uid in (a2, b1, c1))
    assert not (sr_dir / f"{a}.dcm").exists()
    assert (sr_dir / f"{b}.dcm").exists() and (sr_dir / f"{c}.dcm").exists()
    # The empty series folder of a1 went with it; the rows stay, marked.
    assert not paths[a1].parent.exists()
    with sessions() as session:
        purged = {
            i.sop_instance_uid
            for i in session.scalars(select(Instance).where(Instance.purged_at.is_not(None)))
        }
        assert purged == {a1}
        assert len(session.scalars(select(Instance)).all()) == 4
        assert session.scalar(select(Series).limit(1)) is not None
        srs = session.scalars(select(SRDocument).where(SRDocument.purged_at.is_not(None))).all()
        assert [d.path for d in srs] == [str(sr_dir / f"{a}.dcm")]
    # Nothing more is due: a second run deletes nothing.
    assert "purged 0 received object(s)" in purge(data_dir)
    engine.dispose()


def test_purge_without_retention_deletes_nothing(tmp_path: Path) -> None:
    run = subprocess.run(
        [*cli(), "purge", "--data-dir", str(tmp_path)],
        env={k: v for k, v in os.environ.items() if "RETENTION" not in k},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and "file retention is off" in run.stdout
    assert "no file is deleted; pruned 0 C-STORE refusal record(s)" in run.stdout
