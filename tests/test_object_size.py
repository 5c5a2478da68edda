"""The largest object received (``dicom_node.object_size``): counted as it arrives."""

from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import ComputedRadiographyImageStorage  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.object_size import dataset_fragments
from tests.conftest import require
from tests.test_disk import LARGE, TINY, store
from tests.test_scp import DCMTK_ENV, dcmtk, instances
from tests.test_scp_hostile import running_scp

MiB = 1024 * 1024


def pdv(control: int, body: bytes) -> bytes:
    return struct.pack(">LBB", len(body) + 2, 1, control) + body


def test_dataset_fragments_of_a_p_data_tf() -> None:
    items = pdv(0x03, b"c" * 10) + pdv(0x00, b"d" * 100) + pdv(0x02, b"e" * 50)
    pdu = struct.pack(">BBL", 0x04, 0, len(items)) + items
    assert dataset_fragments(pdu) == (150, True)  # the command's 10 bytes are not counted
    items = pdv(0x00, b"d" * 7)
    assert dataset_fragments(struct.pack(">BBL", 0x04, 0, len(items)) + items) == (7, False)


@pytest.mark.slow  # dcmtk's storescu
def test_an_object_above_the_limit_aborts_its_association(
    tmp_path: Path,
    sqlite_db: sessionmaker[Session],
    dicom_samples: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    large, tiny = require(dicom_samples / LARGE), require(dicom_samples / TINY)
    with running_scp(tmp_path, sqlite_db, max_object_bytes=2 * MiB) as scp:
        assert store(scp.port, tiny)[0] == 0x0000
        ds = pydicom.dcmread(large)
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(ComputedRadiographyImageStorage, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="FXTRIAGE")
        assert assoc.is_established
        status = assoc.send_c_store(ds)
        assert not status  # no response: the association was aborted
        assoc.abort()  # (ours may not have seen the connection end yet)
        run = subprocess.run(
            [dcmtk("storescu"), "-aec", "FXTRIAGE", "127.0.0.1", str(scp.port), str(large)],
            env=DCMTK_ENV,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode != 0
        assert str(ds.SOPInstanceUID) not in instances(sqlite_db)
        assert store(scp.port, tiny)[0] == 0x0000  # the node serves on
    assert caplog.text.count("sent an object of more than 2097152 bytes") == 2  # one each
