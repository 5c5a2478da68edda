"""The Image Pixel Module (PS3.3 C.7.6.3) checked against Pixel Data, before decoding.

Validate before allocating: Rows x Columns x Samples per Pixel x Number of Frames against
``max_pixels`` and, for native (uncompressed) Pixel Data, against the length of the Pixel Data
element (PS3.5 8.1.1); for compressed data, the fragments' items (PS3.5 A.4) and the size the
JPEG / JPEG-LS / JPEG 2000 codestream itself declares, which is what the decoders allocate.
Bad integer strings (IS) are refused. The part that does not depend on what this package
decodes, :func:`check_pixel_geometry`, is the storage SCP's own check of every received image;
:func:`check_pixel_data` adds what the renderer needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from model.imaging.encapsulated import (
    codestream_size,
    encapsulated_fragment_bytes,
    first_fragment,
)
from model.imaging.errors import PreprocessError, UnreadablePixelDataError

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

#: Used when a caller passes ``max_pixels=None``; matches ``Settings.max_pixels``.
DEFAULT_MAX_PIXELS = 100_000_000

#: PS3.3 C.7.6.3.1.2: the defined terms of Photometric Interpretation (0028,0004), retired
#: ones included (an old modality may still send them); anything else is not an image anyone
#: can display.
PHOTOMETRIC_TERMS = frozenset(
    {
        "MONOCHROME1",
        "MONOCHROME2",
        "PALETTE COLOR",
        "RGB",
        "HSV",
        "ARGB",
        "CMYK",
        "YBR_FULL",
        "YBR_FULL_422",
        "YBR_PARTIAL_422",
        "YBR_PARTIAL_420",
        "YBR_ICT",
        "YBR_RCT",
        "XYB",
    }
)


@dataclass(frozen=True)
class PixelGeometry:
    """The validated Image Pixel Module attributes (PS3.3 C.7.6.3) of a dataset."""

    rows: int
    columns: int
    samples_per_pixel: int
    frames: int
    bits_allocated: int
    bits_stored: int
    signed: bool
    photometric: str
    encapsulated: bool

    @property
    def pixels(self) -> int:
        """Samples in the whole object (every frame)."""
        return self.rows * self.columns * self.samples_per_pixel * self.frames

    @property
    def native_bytes(self) -> int:
        """The length native (uncompressed) Pixel Data must have, without padding."""
        samples = self.pixels
        if self.photometric == "YBR_FULL_422":
            samples = self.rows * self.columns * 2 * self.frames  # PS3.3 C.7.6.3.1.2
        return (samples * self.bits_allocated + 7) // 8


#: keyword -> (name, tag): messages name attributes as "Bits Allocated (0028,0100)", value-free
#: reasons as "BitsAllocated (0028,0100)" (the SCP's Error Comments).
_ATTRIBUTES = {
    "Rows": ("Rows", "(0028,0010)"),
    "Columns": ("Columns", "(0028,0011)"),
    "SamplesPerPixel": ("Samples per Pixel", "(0028,0002)"),
    "NumberOfFrames": ("Number of Frames", "(0028,0008)"),
    "BitsAllocated": ("Bits Allocated", "(0028,0100)"),
    "BitsStored": ("Bits Stored", "(0028,0101)"),
    "HighBit": ("High Bit", "(0028,0102)"),
    "PixelRepresentation": ("Pixel Representation", "(0028,0103)"),
}


def has_pixel_data(ds: Dataset) -> bool:
    """Any of the three Pixel Data elements (PS3.3 C.7.6.3: Pixel, Float, Double Float)."""
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def int_attribute(
    ds: Dataset, keyword: str, default: int | None = None, *, positive: bool = False
) -> int:
    """An integer attribute (US, or IS whose text pydicom converts on access, PS3.5 6.2).

    Raises :class:`PreprocessError` for a missing (without ``default``), non-integer or,
    with ``positive``, non-positive value; its ``reason`` names the attribute, not the value.
    """
    name, tag = _ATTRIBUTES[keyword]
    label, short = f"{name} {tag}", f"{keyword} {tag}"
    try:
        value = ds.get(keyword)
    except Exception as exc:
        raise PreprocessError(
            f"invalid value for {label}: {exc}", f"{short} is not a valid number"
        ) from exc
    if value is None or value == "":
        if default is None:
            raise PreprocessError(f"missing required attribute {label}", f"{short} is missing")
        return default
    try:
        number = float(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise PreprocessError(
            f"invalid value for {label}: {value!r}", f"{short} is not a valid number"
        ) from exc
    if not math.isfinite(number) or number != int(number):
        raise PreprocessError(
            f"invalid value for {label}: {value!r}", f"{short} is not a valid number"
        )
    if positive and number <= 0:
        raise PreprocessError(
            f"invalid value for {label}: {int(number)} (must be positive)",
            f"{short} must be positive",
        )
    return int(number)


def check_pixel_geometry(
    ds: Dataset, max_pixels: int | None = None, transfer_syntax: str | None = None
) -> PixelGeometry:
    """The checks any stored image passes, whether or not this package can decode it.

    The storage SCP refuses what fails them (PS3.3 C.7.6.3 Image Pixel Module, PS3.5 8.1.1
    and A.4): Pixel Data present and not empty; Rows, Columns, Samples per Pixel and Bits
    Allocated present and positive (Number of Frames too, 1 when absent); Bits Allocated 1,
    8, 16, 32 or 64; Rows x Columns x Samples per Pixel (one frame) at most ``max_pixels``
    (``None``: :data:`DEFAULT_MAX_PIXELS`), checked before anything sizes a buffer from the
    header (e.g. 46341 x 46341); native Pixel Data at least as long as the header requires;
    encapsulated Pixel Data made of well-formed items holding some data.

    ``transfer_syntax`` decides whether Pixel Data is encapsulated; without it, the file
    meta's, else the element's undefined length. Raises :class:`PreprocessError` whose
    ``reason`` holds no attribute value (:class:`UnreadablePixelDataError` when the element
    cannot be read at all). Also: Photometric Interpretation present and a defined term,
    Bits Stored, High Bit and Pixel Representation consistent with Bits Allocated (PS3.3
    C.7.6.3.1), native Pixel Data no longer than the header describes (plus the padding
    byte), and the Pixel Data element holding the length it declared. Whether this package
    can render the Photometric Interpretation is :func:`check_pixel_data`'s business.
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if "PixelData" not in ds:
        missing = "Pixel Data (7FE0,0010) is missing"
        if has_pixel_data(ds):
            raise PreprocessError("Float/Double Float Pixel Data is not a radiograph", missing)
        raise PreprocessError("DICOM object has no Pixel Data (7FE0,0010)", missing)
    rows = int_attribute(ds, "Rows", positive=True)
    columns = int_attribute(ds, "Columns", positive=True)
    samples = int_attribute(ds, "SamplesPerPixel", positive=True)
    frames = int_attribute(ds, "NumberOfFrames", default=1, positive=True)
    bits_allocated = int_attribute(ds, "BitsAllocated", positive=True)
    bits_stored = int_attribute(ds, "BitsStored", default=bits_allocated)
    representation = int_attribute(ds, "PixelRepresentation", default=0)
    if bits_allocated not in (1, 8, 16, 32, 64):
        raise PreprocessError(
            f"unsupported Bits Allocated {bits_allocated}",
            "BitsAllocated (0028,0100) is not 1, 8, 16, 32 or 64",
        )
    _check_bits(ds, bits_allocated, bits_stored, representation)
    if rows * columns * samples > limit:
        raise PreprocessError(
            f"image declares {rows} x {columns} x {samples} samples = {rows * columns * samples}"
            f" samples per frame, more than the limit of {limit}",
            f"Rows x Columns x Samples per Pixel exceeds the node's limit of {limit}",
        )
    photometric = _photometric(ds)
    try:
        declared = _declared_length(ds)
        value = ds["PixelData"].value
    except Exception as exc:
        raise UnreadablePixelDataError(
            f"Pixel Data (7FE0,0010) cannot be read: {type(exc).__name__}",
            "Pixel Data (7FE0,0010) cannot be read",
        ) from exc
    if not isinstance(value, bytes | bytearray) or not value:
        raise PreprocessError("Pixel Data (7FE0,0010) is empty", "Pixel Data (7FE0,0010) is empty")
    geometry = PixelGeometry(
        rows=rows,
        columns=columns,
        samples_per_pixel=samples,
        frames=frames,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        signed=representation == 1,
        photometric=photometric,
        encapsulated=_is_encapsulated(ds, transfer_syntax),
    )
    if geometry.encapsulated:
        try:
            fragment_bytes = encapsulated_fragment_bytes(bytes(value))
        except ValueError as exc:
            reason = f"Pixel Data (7FE0,0010): {exc}"  # a byte offset at most, no value
            raise PreprocessError(reason, reason) from exc
        if fragment_bytes == 0:
            no_data = "encapsulated Pixel Data (7FE0,0010) has no data"
            raise PreprocessError(no_data, no_data)
    elif not geometry.native_bytes <= len(value) <= geometry.native_bytes + 1:
        # PS3.5 8.1.1: native Pixel Data is exactly what the header describes, padded to an
        # even length; more than that is a header that does not describe the data either.
        raise PreprocessError(
            f"Pixel Data holds {len(value)} bytes but {rows} x {columns} x {samples} samples "
            f"x {frames} frames x {bits_allocated} bits need {geometry.native_bytes}: "
            f"{'truncated' if len(value) < geometry.native_bytes else 'overlong'} "
            "or inconsistent header",
            f"Pixel Data (7FE0,0010) has {len(value)} bytes, the header needs "
            f"{geometry.native_bytes}",
        )
    if declared is not None and declared != len(value):
        overrun = (
            f"Pixel Data (7FE0,0010) declares {declared} bytes, the data set holds {len(value)}"
        )
        raise PreprocessError(overrun, overrun)
    return geometry


def _check_bits(ds: Dataset, bits_allocated: int, bits_stored: int, representation: int) -> None:
    """PS3.3 C.7.6.3.1: Bits Stored within 1..Bits Allocated, High Bit (when present) within
    Bits Stored - 1..Bits Allocated - 1, Pixel Representation 0 (unsigned) or 1 (two's
    complement)."""
    if not 1 <= bits_stored <= bits_allocated:
        raise PreprocessError(
            f"Bits Stored {bits_stored} is not within 1..Bits Allocated {bits_allocated}",
            "BitsStored (0028,0101) is not within 1..BitsAllocated (0028,0100)",
        )
    high_bit = int_attribute(ds, "HighBit", default=bits_stored - 1)
    if not bits_stored - 1 <= high_bit <= bits_allocated - 1:
        raise PreprocessError(
            f"High Bit {high_bit} does not fit Bits Stored {bits_stored} and Bits Allocated "
            f"{bits_allocated}",
            "HighBit (0028,0102) does not fit BitsStored and BitsAllocated",
        )
    if representation not in (0, 1):
        raise PreprocessError(
            f"invalid Pixel Representation {representation}",
            "PixelRepresentation (0028,0103) is not 0 or 1",
        )


def _photometric(ds: Dataset) -> str:
    """Photometric Interpretation (0028,0004), Type 1: present and a defined term."""
    try:
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    except Exception:  # noqa: BLE001 - unreadable: as absent
        photometric = ""
    if not photometric:
        raise PreprocessError(
            "missing required attribute Photometric Interpretation (0028,0004)",
            "PhotometricInterpretation (0028,0004) is missing",
        )
    if photometric not in PHOTOMETRIC_TERMS:
        raise PreprocessError(
            "Photometric Interpretation (0028,0004) is not a defined term (PS3.3 C.7.6.3.1.2)",
            "PhotometricInterpretation (0028,0004) is not a defined term",
        )
    return photometric


def _declared_length(ds: Dataset) -> int | None:
    """The length the Pixel Data element declared as received, when it is still the raw
    element read from the stream and of defined length (pydicom reads a value that overruns
    the data set short, without complaint)."""
    raw = ds.get_item("PixelData")
    length = getattr(raw, "length", None)
    if raw is None or not isinstance(length, int) or length == 0xFFFFFFFF:
        return None
    if getattr(raw, "is_undefined_length", False):
        return None
    return length


def check_pixel_data(ds: Dataset, max_pixels: int | None = None) -> PixelGeometry:
    """Validate the Image Pixel attributes before anything is decoded or allocated.

    :func:`check_pixel_geometry` first, then what :mod:`model.imaging.render` decodes:
    Samples per Pixel 1 (MONOCHROME1/2) or 3 (RGB, YBR), Bits Allocated 8, 16 or 32, Bits
    Stored within it, and the whole object (every frame) at most ``max_pixels`` samples. Raises
    :class:`PreprocessError` -- e.g. a header declaring 46341 x 46341 pixels over 9 KB of
    data is refused here instead of allocating 4 GB. For compressed data, the size the JPEG /
    JPEG-LS / JPEG 2000 codestream declares must not exceed Rows x Columns (the decoders
    allocate from it).
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    geometry = check_pixel_geometry(ds, limit)
    rows, columns = geometry.rows, geometry.columns
    samples, frames = geometry.samples_per_pixel, geometry.frames
    bits_allocated = geometry.bits_allocated
    photometric = geometry.photometric
    if rows > 65535 or columns > 65535:
        raise PreprocessError(f"invalid image size {rows} x {columns}")
    if samples not in (1, 3):
        raise PreprocessError(f"unsupported Samples per Pixel {samples}")
    if bits_allocated not in (8, 16, 32):
        raise PreprocessError(f"unsupported Bits Allocated {bits_allocated}")
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if samples != 1:
            raise PreprocessError(f"{photometric} with {samples} samples per pixel")
    elif photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT"):
        if samples != 3:
            raise PreprocessError(f"{photometric} with {samples} samples per pixel")
    else:
        raise PreprocessError(f"unsupported Photometric Interpretation {photometric}")
    if geometry.pixels > limit:
        raise PreprocessError(
            f"image declares {rows} x {columns} x {samples} samples x {frames} frames = "
            f"{geometry.pixels} samples, more than the limit of {limit}"
        )
    if geometry.encapsulated:
        # The decoders size their buffers from the codestream's own header, so it must not
        # declare more pixels than Rows x Columns (which were checked against max_pixels).
        size = codestream_size(first_fragment(ds["PixelData"].value, frames))
        if size is not None and size[0] * size[1] > rows * columns:
            raise PreprocessError(
                f"the compressed frame declares {size[0]} x {size[1]} pixels, more than "
                f"Rows x Columns = {rows} x {columns}"
            )
    return geometry


def _is_encapsulated(ds: Dataset, transfer_syntax: str | None = None) -> bool:
    """Whether Pixel Data is encapsulated: by the transfer syntax, else its length."""
    from pydicom.uid import UID

    uid = transfer_syntax
    if not uid:
        meta = getattr(ds, "file_meta", None)
        uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if uid:
        try:
            return bool(UID(str(uid)).is_encapsulated)
        except ValueError:
            pass
    # No (known) transfer syntax: encapsulated Pixel Data has an undefined length (PS3.5 A.4).
    return bool(ds["PixelData"].is_undefined_length)
