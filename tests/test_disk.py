"""A disk that fills (``fracture_triage.disk``): on a real 20 MiB tmpfs, C-STOREs that would
go below the free-space watermark are answered 0xA700 with an Error Comment and nothing is
written; ``/health`` says so; storing resumes once there is room; with no watermark, a
write that fails for space is never answered Success."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from api.server import QueryServer
from fracture_triage.disk import MiB, space, storage_health, watermark
from fracture_triage.settings import Settings
from tests.conftest import require
from tests.servers import free_port
from tests.test_cli_api import get
from tests.test_scp import instances
from tests.test_scp_hostile import running_scp

OUT_OF_RESOURCES = 0xA700
LARGE = "CR_extremity_RG3_MONO1_10b_EVRLE.dcm"  # 6.2 MB, uncompressed
TINY = "CR_cspine_MONO1_12b_16x16_tiny.dcm"


def test_watermark_is_the_smaller_reserve() -> None:
    assert watermark(100 * 1024**3, 5 * 1024**3, 10.0) == 5 * 1024**3  # 5 GiB < 10 GiB
    assert watermark(20 * MiB, 5 * 1024**3, 10.0) == 2 * MiB  # 10 % of a small disk
    assert watermark(20 * MiB, 0, 10.0) == 2 * MiB
    assert watermark(20 * MiB, 0, 0) == 0


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 20 MiB tmpfs (the tests run as root, as CI does)."""
    mount = tmp_path / "fs"
    mount.mkdir()
    run = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
    )
    if run.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (needs root): {run.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(mount: Path, leave_free: int) -> None:
    """Grow (or shrink) ``mount/filler`` so that ``leave_free`` bytes stay free."""
    filler = mount / "filler"
    st = os.statvfs(mount)
    free = st.f_bavail * st.f_frsize
    size = (filler.stat().st_size if filler.exists() else 0) + free - leave_free
    with open(filler, "ab") as fh:
        fh.truncate(max(0, min(size, fh.tell())))
        while fh.tell() < size:
            fh.write(b"\xff" * min(MiB, size - fh.tell()))


def store(port: int, path: Path) -> tuple[int, str, str]:
    """C-STORE ``path`` under new UIDs: (status, Error Comment, SOP Instance UID)."""
    ds = pydicom.dcmread(path)
    ds.SOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ComputedRadiographyImageStorage, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="FXTRIAGE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    return int(status.Status), str(status.get("ErrorComment", "")), str(ds.SOPInstanceUID)


@pytest.mark.slow  # mounts a file system, runs the SCP
def test_below_the_watermark_stores_are_refused_and_health_says_so(
    tmpfs: Path,
    sqlite_db: sessionmaker[Session],
    dicom_samples: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    large, tiny = require(dicom_samples / LARGE), require(dicom_samples / TINY)
    with running_scp(tmpfs, sqlite_db) as scp:  # data dir on the tmpfs, default watermark
        settings = scp.settings
        reserve = space(settings).watermark_bytes
        assert reserve == 2 * MiB  # 10 % of 20 MiB, below 5 GiB
        http = QueryServer(("127.0.0.1", free_port()), sqlite_db, settings)
        threading.Thread(target=http.serve_forever, daemon=True).start()
        try:
            fill(tmpfs, reserve + MiB)
            status, _, _ = store(scp.port, tiny)
            assert status == 0x0000
            # 6 MB would take it below the reserve: refused, nothing written.
            status, comment, uid = store(scp.port, large)
            assert status == OUT_OF_RESOURCES
            assert comment.startswith("storage full") and len(comment) <= 64
            assert uid not in instances(sqlite_db)
            assert not [p for p in settings.storage_dir.rglob(f"{uid}*")]
            code, health = get(http.server_address[1], "/health")
            assert code == 200 and health["storage"]["status"] == "ok"

            # Below the reserve: even a tiny object is refused, and /health reports it.
            fill(tmpfs, reserve - MiB // 2)
            status, comment, _ = store(scp.port, tiny)
            assert status == OUT_OF_RESOURCES and comment.startswith("storage full")
            code, health = get(http.server_address[1], "/health")
            assert (code, health["status"]) == (503, "storage low")
            assert health["storage"]["free_bytes"] < health["storage"]["watermark_bytes"]
            assert storage_health(settings)["status"] == "low"

            # Room again: storing resumes.
            (tmpfs / "filler").unlink()
            status, _, uid = store(scp.port, large)
            assert status == 0x0000 and uid in instances(sqlite_db)
        finally:
            http.shutdown()
            http.server_close()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert sum("storage low at" in m for m in errors) == 1, errors  # once per episode
    assert "(2 C-STORE(s) were refused)" in caplog.text


@pytest.mark.slow  # mounts a file system, runs the SCP
def test_a_write_that_fails_for_space_is_never_answered_success(
    tmpfs: Path, sqlite_db: sessionmaker[Session], dicom_samples: Path
) -> None:
    large = require(dicom_samples / LARGE)
    with running_scp(tmpfs, sqlite_db, min_free_bytes=0, min_free_percent=0) as scp:
        fill(tmpfs, MiB)
        status, comment, uid = store(scp.port, large)
        assert status == OUT_OF_RESOURCES, comment
        assert "cannot write to storage" in comment
        assert uid not in instances(sqlite_db)
        leftovers = [p.name for p in scp.settings.storage_dir.rglob("*") if p.is_file()]
        assert leftovers == []  # no partial object, no temporary file


def test_settings_default_reserve() -> None:
    settings = Settings()
    assert (settings.min_free_bytes, settings.min_free_percent) == (5 * 1024**3, 10.0)
