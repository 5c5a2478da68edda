"""The storage SCP's header checks and storage helpers, without a network."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from dicom_node.contexts import (
    CANDIDATE_TRANSFER_SYNTAXES,
    LOSSY_TRANSFER_SYNTAXES,
    STORAGE_SOP_CLASSES,
    supported_transfer_syntaxes,
)
from dicom_node.storage import instance_path, write_atomic
from dicom_node.validate import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    INVALID_SOP_INSTANCE,
    Rejection,
    Uids,
    check_dataset,
)
from fracture_triage.uids import is_valid_uid
from model.imaging import encapsulated_fragment_bytes

CR = "1.2.840.10008.5.1.4.1.1.1"


def _item(payload: bytes) -> bytes:
    return struct.pack("<HHI", 0xFFFE, 0xE000, len(payload)) + payload


def _image(**overrides: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CR
    ds.SOPInstanceUID = "1.2.3.4"
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = "1.2.3.5"
    ds.Rows, ds.Columns = 4, 3
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = 16
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = b"\0" * 24
    for key, value in overrides.items():
        if isinstance(value, RawDataElement):
            ds[value.tag] = value
        elif value is None:
            delattr(ds, key)
        else:
            setattr(ds, key, value)
    return ds


def _check(ds: Dataset, ts: str = ExplicitVRLittleEndian, max_pixels: int = 10**8) -> object:
    return check_dataset(
        ds,
        affected_sop_class_uid=CR,
        affected_sop_instance_uid="1.2.3.4",
        transfer_syntax=ts,  # type: ignore[arg-type]
        max_pixels=max_pixels,
    )


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("1.2.840.10008.5.1.4.1.1.1", True),
        ("0.0", True),
        ("1.20.300", True),
        # PS3.5 9.1: no leading zero in a multi-digit component (the SR could not reference
        # it, so the SCP refuses it too).
        ("999.999.01.23.45.6789", False),
        ("1.2.03.4", False),
        ("1." + "2" * 62, True),  # 64 characters
        ("1." + "2" * 63, False),
        ("1" * 64, False),  # one component: PS3.5 9.1 wants a root and a suffix
        ("", False),
        ("1..2", False),
        (".1.2", False),
        ("1.2.", False),
        ("..", False),
        ("../../etc/passwd", False),
        ("1.2/3", False),
        ("1.2.3 ", False),
        (["1.2", "1.3"], False),
        (None, False),
    ],
)
def test_uid_check(value: object, valid: bool) -> None:
    assert is_valid_uid(value) is valid


def test_a_valid_image_passes() -> None:
    checked = _check(_image())
    assert checked.unclassifiable is None  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("overrides", "status", "words"),
    [
        ({"PixelData": None}, DATASET_MISMATCH, "Pixel Data (7FE0,0010) is missing"),
        ({"PixelData": b"\0" * 22}, DATASET_MISMATCH, "has 22 bytes, the header needs 24"),
        ({"Rows": None}, DATASET_MISMATCH, "Rows (0028,0010) is missing"),
        ({"Rows": 46341, "Columns": 46341}, DATASET_MISMATCH, "exceeds the node's limit"),
        ({"BitsAllocated": 12}, DATASET_MISMATCH, "BitsAllocated"),
        # As read from BAD_RTDOSE_badVR_IS_value_1A.dcm: converted (and failing) on access.
        (
            {"NumberOfFrames": RawDataElement(Tag(0x00280008), "IS", 2, b"1A", 0, False, True)},
            DATASET_MISMATCH,
            "NumberOfFrames (0028,0008) is not a valid number",
        ),
        ({"SOPInstanceUID": "1.2.3.9"}, INVALID_SOP_INSTANCE, "Affected SOP Instance UID"),
        ({"SOPInstanceUID": "1..2"}, INVALID_SOP_INSTANCE, "invalid"),
        ({"SOPInstanceUID": "1.2.03.4"}, INVALID_SOP_INSTANCE, "PS3.5 9.1"),
        ({"StudyInstanceUID": "1.2.03.4"}, DATASET_MISMATCH, "Study Instance UID"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.4"}, DATASET_MISMATCH, "Affected SOP Class"),
        ({"StudyInstanceUID": None}, DATASET_MISMATCH, "Study Instance UID"),
        ({"SeriesInstanceUID": "x"}, DATASET_MISMATCH, "Series Instance UID"),
        # What the fuzz harness found stored as received (PS3.3 C.7.6.3.1, PS3.5 8.1.1, 6.2):
        ({"PixelData": b"\0" * 26}, DATASET_MISMATCH, "has 26 bytes, the header needs 24"),
        (
            {"PixelData": RawDataElement(Tag(0x7FE00010), "OW", 40, b"\0" * 24, 0, False, True)},
            DATASET_MISMATCH,
            "declares 40 bytes, the data set holds 24",
        ),
        ({"PhotometricInterpretation": "FOO"}, DATASET_MISMATCH, "not a defined term"),
        ({"PhotometricInterpretation": None}, DATASET_MISMATCH, "Interpretation (0028,0004) is"),
        ({"BitsStored": 65535}, DATASET_MISMATCH, "BitsStored (0028,0101) is not within"),
        ({"BitsStored": 12, "HighBit": 8}, DATASET_MISMATCH, "HighBit (0028,0102)"),
        ({"PixelRepresentation": 2}, DATASET_MISMATCH, "PixelRepresentation (0028,0103)"),
        (
            {"PatientName": RawDataElement(Tag(0x00100010), "ZZ", 4, b"ABCD", 0, False, True)},
            CANNOT_UNDERSTAND,
            "(0010,0010) has an unknown VR",
        ),
    ],
)
def test_refusals(overrides: dict[str, object], status: int, words: str) -> None:
    with pytest.raises(Rejection) as caught:
        _check(_image(**overrides))
    assert caught.value.status == status
    assert words in caught.value.reason


def test_an_empty_data_set_cannot_be_understood() -> None:
    with pytest.raises(Rejection) as caught:
        _check(Dataset())
    assert caught.value.status == CANNOT_UNDERSTAND


def test_colour_and_multiframe_are_stored_but_not_classified() -> None:
    rgb = _image(SamplesPerPixel=3, PhotometricInterpretation="RGB", PixelData=b"\0" * 72)
    assert "grayscale" in (_check(rgb).unclassifiable or "")  # type: ignore[attr-defined]
    multi = _image(NumberOfFrames=2, PixelData=b"\0" * 48)
    assert "multi-frame" in (_check(multi).unclassifiable or "")  # type: ignore[attr-defined]


def test_encapsulated_pixel_data() -> None:
    stream = _item(b"") + _item(b"\xff\xd8" + b"x" * 98) + _item(b"y" * 50)
    assert encapsulated_fragment_bytes(stream) == 150
    assert encapsulated_fragment_bytes(stream + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)) == 150
    with pytest.raises(ValueError, match="truncated"):
        encapsulated_fragment_bytes(stream[:-10])
    with pytest.raises(ValueError, match="unexpected item"):
        encapsulated_fragment_bytes(b"\x10\x00\x10\x00" + stream)
    ds = _image(PixelData=_item(b"") + _item(b""))
    with pytest.raises(Rejection, match="no data"):
        _check(ds, ts=JPEGBaseline8Bit)
    _check(_image(PixelData=stream), ts=JPEGBaseline8Bit)


def test_paths_come_from_valid_uids_only(tmp_path: Path) -> None:
    good = Uids(CR, "1.2.3.4", "1.2.3", "1.2.3.5")
    assert instance_path(tmp_path, good) == tmp_path / "1.2.3" / "1.2.3.5" / "1.2.3.4.dcm"
    with pytest.raises(ValueError):
        instance_path(tmp_path, Uids(CR, "1.2.3.4", "..", "1.2.3.5"))


def test_atomic_write_leaves_the_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "c.dcm"
    write_atomic(target, [b"one", b"two"])
    write_atomic(target, [b"three"])
    assert target.read_bytes() == b"three"
    assert [p.name for p in target.parent.iterdir()] == ["c.dcm"]


def test_every_required_transfer_syntax_and_sop_class_is_offered() -> None:
    offered = {str(uid) for uid in supported_transfer_syntaxes()}
    required = {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.1.99",
        "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",
        "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80",
        "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
        "1.2.840.10008.1.2.5",
    }  # fmt: skip
    assert required <= offered
    assert set(STORAGE_SOP_CLASSES) == {
        "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1",
        "1.2.840.10008.5.1.4.1.1.1.1.1", "1.2.840.10008.5.1.4.1.1.7",
    }  # fmt: skip


def test_lossy_transfer_syntaxes_come_last() -> None:
    """An SCU offering a lossless and a lossy syntax in one context is asked for the former."""
    order = list(CANDIDATE_TRANSFER_SYNTAXES)
    first_lossy = min(order.index(uid) for uid in LOSSY_TRANSFER_SYNTAXES)
    assert all(uid in LOSSY_TRANSFER_SYNTAXES for uid in order[first_lossy:])
    assert order[:2] == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
