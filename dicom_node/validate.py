"""Checks a received object passes before it is stored (PS3.4 B.2.3, PS3.3 C.7.6.3).

The checks read the header only: pixel data is never decoded here (the worker does that).
The Image Pixel Module checks are the worker's own (``model.imaging``, pure numpy / pydicom,
which loads no network runtime), so the node and the worker cannot disagree on what a
consistent header is.
They refuse what could not be stored safely or classified at all, with a C-STORE failure
status, and note what can be stored but not classified (colour, multi-frame) so that the
instance is recorded as failed at once instead of queued.

Reasons never contain attribute values, only names and tags: they go to logs and to the
peer's Error Comment, and must not carry patient identifiers.
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pydicom.valuerep import VR

from dicom_node.contexts import STORAGE_SOP_CLASSES
from fracture_triage.uids import is_valid_uid
from model.imaging import (
    PixelGeometry,
    PreprocessError,
    UnreadablePixelDataError,
    check_pixel_geometry,
)

# C-STORE response statuses (PS3.4 Table B.2-1, PS3.7 Annex C).
SUCCESS = 0x0000  # Success
INVALID_SOP_INSTANCE = 0x0117  # Failure: Invalid SOP Instance (PS3.7 C.5.6)
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Failure: Refused: SOP Class not supported (PS3.7 C.5.8)
OUT_OF_RESOURCES = 0xA700  # Failure: Refused: Out of Resources (transient, peer retries)
DATASET_MISMATCH = 0xA900  # Failure: Error: Data Set does not match SOP Class
CANNOT_UNDERSTAND = 0xC000  # Failure: Error: Cannot understand
#: Failure: Error: Cannot understand (C000-CFFF), this node's code for an object whose series
#: or study contradicts the stored identity (``db.identity``): refused, never merged.
IDENTITY_CONFLICT = 0xC001

#: How a refused UID is described (the peer's Error Comment is cut to 64 characters).
_NOT_A_UID = "missing or invalid (PS3.5 9.1)"

#: The Value Representations of PS3.5 Table 6.2-1, and pydicom's names for a VR its data
#: dictionary leaves to the context (implicit VR: "US or SS", "OB or OW", ...).
_KNOWN_VRS = frozenset(str(vr) for vr in VR)


class Rejection(Exception):  # noqa: N818 - a refusal with a DIMSE status, not a program error
    """The object is refused with ``status``; ``reason`` names what is wrong (no values)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Uids:
    """The UIDs of a received object, each checked with
    :func:`fracture_triage.uids.is_valid_uid` (PS3.5 9.1, the rule the SR builder applies)."""

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


def _check_vrs(ds: Dataset) -> None:
    """Every top-level element has a VR of PS3.5 Table 6.2-1 (explicit VR streams carry it).

    pydicom reads an element with an unknown VR ("ZZ", two NULs) as raw bytes and raises only
    when the value is accessed, so the object would be stored and fail later. 0xC000: the
    data set cannot be understood. Read from the raw elements, nothing is converted.
    """
    for tag in ds.keys():  # noqa: SIM118 - iterating a Dataset would convert every value
        vr = getattr(ds.get_item(tag), "VR", None)
        if vr is None:
            continue  # implicit VR, resolved from the data dictionary on access
        if str(vr) not in _KNOWN_VRS and " or " not in str(vr):
            group, element = tag >> 16, tag & 0xFFFF
            raise Rejection(
                CANNOT_UNDERSTAND,
                f"({group:04X},{element:04X}) has an unknown VR (PS3.5 6.2)",
            )


def _check_pixels(ds: Dataset, transfer_syntax: UID, max_pixels: int) -> PixelGeometry:
    """Image Pixel Module against Pixel Data: :func:`model.imaging.check_pixel_geometry`.

    The one implementation the worker's preprocessing shares, mapped to C-STORE statuses:
    0xA900 for an inconsistent header or Pixel Data, 0xC000 when Pixel Data cannot be read.
    Its ``reason`` carries no attribute value.
    """
    try:
        return check_pixel_geometry(ds, max_pixels, transfer_syntax)
    except UnreadablePixelDataError as exc:
        raise Rejection(CANNOT_UNDERSTAND, exc.reason or "Pixel Data cannot be read") from exc
    except PreprocessError as exc:
        reason = exc.reason or "the Image Pixel Module does not match the Pixel Data"
        raise Rejection(DATASET_MISMATCH, reason) from exc


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
    except Exception as exc:  # the stream cannot be parsed at all
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
    # A UID the SR could not reference (e.g. a leading-zero component "1.2.03") is refused
    # here, not accepted and then left out of the report: PS3.5 9.1.
    if not is_valid_uid(sop_instance):
        raise Rejection(INVALID_SOP_INSTANCE, f"SOP Instance UID (0008,0018) {_NOT_A_UID}")
    if sop_instance != affected_sop_instance_uid:
        raise Rejection(
            INVALID_SOP_INSTANCE,
            "SOP Instance UID (0008,0018) differs from the Affected SOP Instance UID",
        )
    study = _text(ds, "StudyInstanceUID")
    if not is_valid_uid(study):
        raise Rejection(DATASET_MISMATCH, f"Study Instance UID (0020,000D) {_NOT_A_UID}")
    series = _text(ds, "SeriesInstanceUID")
    if not is_valid_uid(series):
        raise Rejection(DATASET_MISMATCH, f"Series Instance UID (0020,000E) {_NOT_A_UID}")
    uids = Uids(sop_class, str(sop_instance), str(study), str(series))

    _check_vrs(ds)
    geometry = _check_pixels(ds, transfer_syntax, max_pixels)
    # Deliberately not checked here: Window Center/Width and Rescale Slope/Intercept values
    # that model.imaging refuses (Window Width < 1 or NaN, Rescale Slope 0; PS3.3 C.11.1,
    # C.11.2.1.2). The object is still a valid storage object (PS3.4 B.2.3: the SCP stores
    # what conforms to its SOP Class; these values only make one rendering of it unusable),
    # and refusing it would make the modality resend or drop it with nobody seeing why.
    # It is stored and the worker fails the instance with the reason, which shows in the
    # results and the study's report.

    unclassifiable = None
    if geometry.photometric not in ("MONOCHROME1", "MONOCHROME2"):
        unclassifiable = (
            "not a grayscale image (Photometric Interpretation is not MONOCHROME1/2): "
            "the classifier reads grayscale radiographs"
        )
    elif geometry.frames > 1:
        unclassifiable = (
            f"multi-frame image ({geometry.frames} frames): the classifier reads single frames"
        )
    return CheckedObject(uids=uids, unclassifiable=unclassifiable)
