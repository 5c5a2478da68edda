"""Checks a received object passes before it is stored (PS3.4 B.2.3, PS3.3 C.7.6.3).

The checks read the header only: pixel data is never decoded here (the worker does that).
They refuse what could not be stored safely or classified at all, with a C-STORE failure
status, and note what can be stored but not classified (colour, multi-frame) so that the
instance is recorded as failed at once instead of queued.

Reasons never contain attribute values, only names and tags: they go to logs and to the
peer's Error Comment, and must not carry patient identifiers.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node.contexts import STORAGE_SOP_CLASSES

# C-STORE response statuses (PS3.4 Table B.2-1, PS3.7 Annex C).
SUCCESS = 0x0000  # Success
INVALID_SOP_INSTANCE = 0x0117  # Failure: Invalid SOP Instance (PS3.7 C.5.6)
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Failure: Refused: SOP Class not supported (PS3.7 C.5.8)
OUT_OF_RESOURCES = 0xA700  # Failure: Refused: Out of Resources (transient, peer retries)
DATASET_MISMATCH = 0xA900  # Failure: Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Failure: Error: Cannot understand

#: PS3.5 9.1: digits and dots, at most 64 characters. Components with a leading zero are
#: forbidden by the standard but common in real devices' UIDs; they are accepted because they
#: are harmless in a path (only digits and dots, no empty component: no "..", no "/").
_UID_RE = re.compile(r"[0-9]+(\.[0-9]+)*")

_ITEM = 0xE000FFFE  # (FFFE,E000) Item, read as a little-endian uint32 of group, element
_SEQ_DELIM = 0xE0DDFFFE  # (FFFE,E0DD) Sequence Delimitation Item


class Rejection(Exception):
    """The object is refused with ``status``; ``reason`` names what is wrong (no values)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def is_valid_uid(value: object) -> bool:
    """A UID usable as a path component: 1-64 characters, digits and dots, no empty part."""
    return isinstance(value, str) and 0 < len(value) <= 64 and bool(_UID_RE.fullmatch(value))


@dataclass(frozen=True)
class Uids:
    """The UIDs of a received object, each checked with :func:`is_valid_uid`."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


@dataclass(frozen=True)
class CheckedObject:
    """An object that passed the checks and can be stored."""

    uids: Uids
    #: Set when the object is stored but cannot be classified (the instance is recorded failed).
    unclassifiable: str | None


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # noqa: BLE001 - a malformed element reads as absent
        return None
    return str(value) if isinstance(value, str) else None


def usable_uids(ds: Dataset) -> Uids | None:
    """The object's UIDs if all four are present and valid (to record a refused object)."""
    values = [
        _text(ds, k)
        for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    ]
    if not all(is_valid_uid(v) for v in values):
        return None
    return Uids(*(str(v) for v in values))


def _int(ds: Dataset, keyword: str, tag: str, default: int | None = None) -> int:
    """A required (or defaulted) integer attribute, refused with 0xA900 when unusable."""
    try:
        value = ds.get(keyword)
    except Exception as exc:  # noqa: BLE001 - pydicom raises ValueError etc. on bad values
        raise Rejection(DATASET_MISMATCH, f"{keyword} {tag} is not a valid number") from exc
    if value is None or value == "":
        if default is not None:
            return default
        raise Rejection(DATASET_MISMATCH, f"{keyword} {tag} is missing")
    try:
        number = int(value)
    except (TypeError, ValueError) as exc:
        raise Rejection(DATASET_MISMATCH, f"{keyword} {tag} is not a valid number") from exc
    if number <= 0:
        raise Rejection(DATASET_MISMATCH, f"{keyword} {tag} must be positive")
    return number


def encapsulated_fragment_bytes(value: bytes) -> int:
    """Total length of the non-empty fragments of encapsulated Pixel Data (PS3.5 A.4).

    Walks the items after the Basic Offset Table; raises ``ValueError`` when an item is
    malformed or runs past the end of the value (a truncated stream).
    """
    offset, total, first = 0, 0, True
    while offset + 8 <= len(value):
        tag, length = struct.unpack_from("<II", value, offset)
        if tag == _SEQ_DELIM:
            break
        if tag != _ITEM or length == 0xFFFFFFFF:
            raise ValueError(f"unexpected item at byte {offset} of the encapsulated Pixel Data")
        offset += 8
        if offset + length > len(value):
            raise ValueError("an encapsulated Pixel Data fragment is truncated")
        if not first:  # the first item is the Basic Offset Table, not image data
            total += length
        first = False
        offset += length
    return total


def check_pixel_data(ds: Dataset, transfer_syntax: UID, max_pixels: int) -> int:
    """Check Image Pixel Module attributes against Pixel Data; return the number of frames."""
    rows = _int(ds, "Rows", "(0028,0010)")
    columns = _int(ds, "Columns", "(0028,0011)")
    samples = _int(ds, "SamplesPerPixel", "(0028,0002)")
    bits_allocated = _int(ds, "BitsAllocated", "(0028,0100)")
    frames = _int(ds, "NumberOfFrames", "(0028,0008)", default=1)
    if bits_allocated not in (1, 8, 16, 32, 64):
        raise Rejection(DATASET_MISMATCH, "BitsAllocated (0028,0100) is not 1, 8, 16, 32 or 64")
    # Refuse absurd headers before anything sizes a buffer from them (e.g. 46341 x 46341).
    if rows * columns * samples > max_pixels:
        raise Rejection(
            DATASET_MISMATCH,
            f"Rows x Columns x Samples per Pixel exceeds the node's limit of {max_pixels}",
        )
    if "PixelData" not in ds:
        raise Rejection(DATASET_MISMATCH, "Pixel Data (7FE0,0010) is missing")
    try:
        element = ds["PixelData"]
        value = element.value
    except Exception as exc:  # noqa: BLE001 - unreadable element
        raise Rejection(CANNOT_UNDERSTAND, "Pixel Data (7FE0,0010) cannot be read") from exc
    if not isinstance(value, bytes | bytearray) or not value:
        raise Rejection(DATASET_MISMATCH, "Pixel Data (7FE0,0010) is empty")
    if transfer_syntax.is_encapsulated:
        try:
            fragment_bytes = encapsulated_fragment_bytes(bytes(value))
        except ValueError as exc:
            raise Rejection(DATASET_MISMATCH, f"Pixel Data (7FE0,0010): {exc}") from exc
        if fragment_bytes == 0:
            raise Rejection(DATASET_MISMATCH, "encapsulated Pixel Data (7FE0,0010) has no data")
    else:
        expected = (rows * columns * samples * frames * bits_allocated + 7) // 8
        if len(value) < expected:
            raise Rejection(
                DATASET_MISMATCH,
                f"Pixel Data (7FE0,0010) has {len(value)} bytes, the header needs {expected}",
            )
    return frames


def check_dataset(
    ds: Dataset,
    *,
    affected_sop_class_uid: str,
    affected_sop_instance_uid: str,
    transfer_syntax: UID,
    max_pixels: int,
) -> CheckedObject:
    """Check a received C-STORE data set; raise :class:`Rejection` with the status to answer."""
    try:
        nr_elements = len(ds)
    except Exception as exc:  # noqa: BLE001 - the stream cannot be parsed at all
        raise Rejection(CANNOT_UNDERSTAND, "the data set cannot be parsed") from exc
    if nr_elements == 0:
        # pydicom returns an empty data set, with only a warning, for a truncated stream.
        raise Rejection(CANNOT_UNDERSTAND, "the data set is empty or truncated")

    sop_class = _text(ds, "SOPClassUID")
    if sop_class is None:
        raise Rejection(DATASET_MISMATCH, "SOP Class UID (0008,0016) is missing")
    if sop_class != affected_sop_class_uid:
        raise Rejection(
            DATASET_MISMATCH, "SOP Class UID (0008,0016) differs from the Affected SOP Class UID"
        )
    if sop_class not in STORAGE_SOP_CLASSES:  # the context was accepted for another class
        raise Rejection(SOP_CLASS_NOT_SUPPORTED, "SOP Class not supported by this node")

    sop_instance = _text(ds, "SOPInstanceUID")
    if not is_valid_uid(sop_instance):
        raise Rejection(INVALID_SOP_INSTANCE, "SOP Instance UID (0008,0018) is missing or invalid")
    if sop_instance != affected_sop_instance_uid:
        raise Rejection(
            INVALID_SOP_INSTANCE,
            "SOP Instance UID (0008,0018) differs from the Affected SOP Instance UID",
        )
    study = _text(ds, "StudyInstanceUID")
    if not is_valid_uid(study):
        raise Rejection(DATASET_MISMATCH, "Study Instance UID (0020,000D) is missing or invalid")
    series = _text(ds, "SeriesInstanceUID")
    if not is_valid_uid(series):
        raise Rejection(DATASET_MISMATCH, "Series Instance UID (0020,000E) is missing or invalid")
    uids = Uids(sop_class, str(sop_instance), str(study), str(series))

    frames = check_pixel_data(ds, transfer_syntax, max_pixels)

    unclassifiable = None
    photometric = _text(ds, "PhotometricInterpretation") or ""
    if photometric.strip() not in ("MONOCHROME1", "MONOCHROME2"):
        unclassifiable = (
            "not a grayscale image (Photometric Interpretation is not MONOCHROME1/2): "
            "the classifier reads grayscale radiographs"
        )
    elif frames > 1:
        unclassifiable = f"multi-frame image ({frames} frames): the classifier reads single frames"
    return CheckedObject(uids=uids, unclassifiable=unclassifiable)
