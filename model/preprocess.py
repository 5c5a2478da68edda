"""One preprocessing function shared by training, evaluation and the worker.

Any supported radiograph (DICOM or picture file) becomes the network's input the way the
training images look: bone bright, 8 bits, resized to a square, 3 channels.

DICOM pipeline (PS3.3 C.11 "Look Up Tables and Presentation States", PS3.4 N.2.1):

1. Read (:func:`read_dataset`): Part 10 files, bare datasets without preamble or File Meta
   Information (the transfer syntax is inferred from the encoding pydicom detected; Implicit
   VR Little Endian for the usual case, PS3.5 A.1), Deflated and Big Endian. Truncated files,
   which pydicom returns as an (almost) empty dataset with only a warning, are refused, and so
   are datasets whose elements contradict their transfer syntax's VR encoding.
2. Validate before allocating (:func:`check_pixel_data`): Rows x Columns x Samples per Pixel x
   Number of Frames against ``max_pixels`` and, for native (uncompressed) Pixel Data, against
   the length of the Pixel Data element (PS3.5 8.1.1); for compressed data, the fragments'
   items (PS3.5 A.4) and the size the JPEG / JPEG-LS / JPEG 2000 codestream itself declares,
   which is what the decoders allocate. Bad integer strings (IS) are refused. The part that
   does not depend on what this module decodes, :func:`check_pixel_geometry`, is the storage
   SCP's own check of every received image.
3. Decode the first frame only (pydicom 3 with the pylibjpeg, pyjpegls and RLE plugins; the
   12-bit JPEG Extended process is decoded by pylibjpeg-libjpeg only).
4. Grayscale rendering (:func:`dataset_to_uint8`): Modality LUT Sequence, else Rescale
   Slope/Intercept (PS3.3 C.11.1); then the first VOI LUT Sequence item, else the first Window
   Center/Width pair with its VOI LUT Function (PS3.3 C.11.2, C.11.2.1.2, C.11.2.1.3); then
   MONOCHROME1 inverted so that bone is bright (PS3.3 C.7.6.3.1.2); 8 bits. Colour images become
   gray with Pillow's own luma weights, so a colour picture and its DICOM agree.
5. Resize to a square and repeat to 3 channels (:func:`to_network_input`), exactly as for
   pictures.

Decisions worth knowing (each is explained where it is made):

- VOI LUT Sequence before Window Center/Width when both are present: PS3.3 C.11.2 lets a
  display apply either ("inclusion of both indicates that multiple alternative views may be
  presented"); the LUT is the vendor's tuned rendering (pydicom's ``apply_voi_lut`` makes the
  same choice). Only the first item / first window pair is used.
- Window in the Modality LUT's output space, and refused when it is inconsistent with the data:
  a window that leaves fewer than 1% of the pixels between full black and full white is tried
  again on values shifted by 2^(Bits Stored - 1) (the "+32768 offset" of signed data stored
  unsigned, e.g. GDCM's DX_J2K_0Padding), and dropped for the no-VOI rendering otherwise.
  Rendered as its header says: that file (MONOCHROME2, IDENTITY, Pixel Intensity
  Relationship LIN with sign +1) shows bone dark, and no header rule could say otherwise.
- No VOI at all (PS3.3 C.11.2 leaves it to the application): unsigned data whose declared
  depth is in use -- 8 bits stored or fewer always (pictures, secondary captures), deeper
  data when a value reaches the top half of 0..2^n-1 -- is shown over that full representable
  range, like a display without a VOI; so an 8-bit picture stored as DICOM, or scaled to 12 or
  16 bits, comes back pixel-identical. Otherwise (Bits Stored overstating the depth, e.g. a
  12-bit detector declared as 16 bits, which would render near black; or signed data) over
  the range of the values present.
- MONOCHROME1 is inverted; Presentation LUT Shape never adds a second inversion. In the DX,
  MG and IO image modules (PS3.3 C.8.11.6 and its siblings) INVERSE *is* the MONOCHROME1
  inversion ("shall be used if Photometric Interpretation is MONOCHROME1") and IDENTITY goes
  with MONOCHROME2, so the shape carries no information beyond the Photometric
  Interpretation. The only case where the two rules differ, MONOCHROME2 + INVERSE, is
  non-conformant for these SOP classes and is known from the field as a vendor error (dcm4chee
  added an option to ignore the shape and trust Photometric Interpretation for exactly this),
  so the Photometric Interpretation wins and a warning is logged.
"""

from __future__ import annotations

import logging
import math
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

#: Used when a caller passes ``max_pixels=None``; matches ``Settings.max_pixels``.
DEFAULT_MAX_PIXELS = 100_000_000

#: A window that leaves fewer pixels than this between black and white is inconsistent.
_MIN_WINDOW_FRACTION = 0.01

# Domains of integer pixel values larger than this are rendered pixel by pixel instead of
# through a lookup table over every possible value.
_MAX_LUT_SPAN = 1 << 20

# Magic numbers of the picture formats Pillow reads here; anything else may be DICOM.
_PICTURE_MAGIC = (
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF87a",
    b"GIF89a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
)

# CharLS (pyjpegls) decodes JPEG-LS 3-4x faster than libjpeg (pylibjpeg), which pydicom
# would try first; measured 54 vs 186 ms on a 1760x1760 CR. Other syntaxes: pydicom's order
# (12-bit JPEG Extended is decoded by pylibjpeg-libjpeg only; Pillow and GDCM refuse it).
_PREFERRED_PLUGIN = {
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS Near-Lossless
}

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"


class PreprocessError(ValueError):
    """The file cannot be turned into a network input; the message is meant for users.

    ``reason``, set by :func:`check_pixel_geometry`, says the same without any attribute
    value: the storage SCP sends it to its peer and logs it, so it must not carry patient
    identifiers. ``None`` where no such text was given.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class UnreadablePixelDataError(PreprocessError):
    """The Pixel Data element itself cannot be read (the SCP answers "Cannot understand")."""


# --------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------


def image_to_uint8(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a PNG/JPEG/GIF/BMP/TIFF picture as 8-bit grayscale (H, W).

    Colour becomes gray with Pillow's ITU-R 601 luma (``convert("L")``); 16-bit and float
    grayscale pictures are scaled over the range of their values, like deep DICOM data without
    a window.
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    name = Path(path).name
    try:
        with Image.open(path) as im:
            # Checked on the header, before Pillow allocates the decoded picture.
            if im.width * im.height > limit:
                raise PreprocessError(
                    f"image {name} is {im.width}x{im.height} pixels, more than the limit of "
                    f"{limit} pixels"
                )
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
                return _range_to_uint8(np.asarray(im, dtype=np.float64))
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except PreprocessError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise PreprocessError(f"unreadable image {name}: {exc}") from exc


def _range_to_uint8(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# DICOM: reading and validation
# --------------------------------------------------------------------------------------------


def read_dataset(path: Path) -> Dataset:
    """Read a DICOM file (Part 10 or a bare dataset) for decoding; raises PreprocessError.

    - No File Meta Information (or one without Transfer Syntax UID): the transfer syntax is
      set from the encoding pydicom detected while reading (usually Implicit VR Little Endian,
      the DICOM default, PS3.5 10.1), so that the pixel decoders know what they have.
    - pydicom returns a truncated file as an almost empty dataset with only a warning; such a
      file, or any file without Pixel Data, is refused with the reason.
    - A dataset whose elements do not use its transfer syntax's VR encoding (pydicom warns
      "Expected explicit VR, but found implicit VR") is refused: the file is malformed
      (PS3.5 7.1) and nothing read from it can be trusted.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    name = Path(path).name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, force=True)
        except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError) as exc:
            raise PreprocessError(f"not a readable DICOM file ({name}): {exc}") from exc
    messages = [str(w.message) for w in caught]
    if any("found implicit VR" in m or "found explicit VR" in m for m in messages):
        raise PreprocessError(
            "malformed DICOM: elements are not encoded with the VR encoding of the file's "
            "transfer syntax (explicit and implicit VR mixed)"
        )
    truncated = any("End of file" in m or "truncat" in m.lower() for m in messages)
    if len(ds) == 0 or not _has_pixel_data(ds):
        if truncated:
            raise PreprocessError(
                "DICOM file is truncated: it ends before its Pixel Data (7FE0,0010) is complete"
            )
        raise PreprocessError("DICOM object has no Pixel Data (7FE0,0010)")
    _ensure_transfer_syntax(ds)
    return ds


def _has_pixel_data(ds: Dataset) -> bool:
    return any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _ensure_transfer_syntax(ds: Dataset) -> None:
    from pydicom.dataset import FileMetaDataset

    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = FileMetaDataset()
        ds.file_meta = meta
    if meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        implicit, little = True, True
    meta.TransferSyntaxUID = (
        _IMPLICIT_LE if implicit else (_EXPLICIT_LE if little else _EXPLICIT_BE)
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
    "PixelRepresentation": ("Pixel Representation", "(0028,0103)"),
}

_ITEM = 0xE000FFFE  # (FFFE,E000) Item, read as a little-endian uint32 of group, element
_SEQ_DELIM = 0xE0DDFFFE  # (FFFE,E0DD) Sequence Delimitation Item


def _int_attribute(
    ds: Dataset, keyword: str, default: int | None = None, *, positive: bool = False
) -> int:
    """An integer attribute (US, or IS whose text pydicom converts on access)."""
    name, tag = _ATTRIBUTES[keyword]
    label, short = f"{name} {tag}", f"{keyword} {tag}"
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom raises ValueError etc. on bad values
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


def check_pixel_geometry(
    ds: Dataset, max_pixels: int | None = None, transfer_syntax: str | None = None
) -> PixelGeometry:
    """The checks any stored image passes, whether or not this module can decode it.

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
    cannot be read at all). Photometric Interpretation, Bits Stored and Pixel Representation
    are read but not checked: :func:`check_pixel_data` adds what decoding needs.
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    if "PixelData" not in ds:
        missing = "Pixel Data (7FE0,0010) is missing"
        if _has_pixel_data(ds):
            raise PreprocessError("Float/Double Float Pixel Data is not a radiograph", missing)
        raise PreprocessError("DICOM object has no Pixel Data (7FE0,0010)", missing)
    rows = _int_attribute(ds, "Rows", positive=True)
    columns = _int_attribute(ds, "Columns", positive=True)
    samples = _int_attribute(ds, "SamplesPerPixel", positive=True)
    frames = _int_attribute(ds, "NumberOfFrames", default=1, positive=True)
    bits_allocated = _int_attribute(ds, "BitsAllocated", positive=True)
    bits_stored = _int_attribute(ds, "BitsStored", default=bits_allocated)
    representation = _int_attribute(ds, "PixelRepresentation", default=0)
    if bits_allocated not in (1, 8, 16, 32, 64):
        raise PreprocessError(
            f"unsupported Bits Allocated {bits_allocated}",
            "BitsAllocated (0028,0100) is not 1, 8, 16, 32 or 64",
        )
    if rows * columns * samples > limit:
        raise PreprocessError(
            f"image declares {rows} x {columns} x {samples} samples = {rows * columns * samples}"
            f" samples per frame, more than the limit of {limit}",
            f"Rows x Columns x Samples per Pixel exceeds the node's limit of {limit}",
        )
    try:
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    except Exception:  # noqa: BLE001 - unreadable: as absent (check_pixel_data refuses it)
        photometric = ""
    try:
        value = ds["PixelData"].value
    except Exception as exc:  # a malformed element, whatever pydicom raises
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
    elif len(value) < geometry.native_bytes:
        raise PreprocessError(
            f"Pixel Data holds {len(value)} bytes but {rows} x {columns} x {samples} samples "
            f"x {frames} frames x {bits_allocated} bits need {geometry.native_bytes}: "
            "truncated or inconsistent header",
            f"Pixel Data (7FE0,0010) has {len(value)} bytes, the header needs "
            f"{geometry.native_bytes}",
        )
    return geometry


def check_pixel_data(ds: Dataset, max_pixels: int | None = None) -> PixelGeometry:
    """Validate the Image Pixel attributes before anything is decoded or allocated.

    :func:`check_pixel_geometry` first, then what this module decodes: Samples per Pixel 1
    (MONOCHROME1/2) or 3 (RGB, YBR), Bits Allocated 8, 16 or 32, Bits Stored within it, and
    the whole object (every frame) at most ``max_pixels`` samples. Raises
    :class:`PreprocessError` -- e.g. a header declaring 46341 x 46341 pixels over 9 KB of
    data is refused here instead of allocating 4 GB. For compressed data, the size the JPEG /
    JPEG-LS / JPEG 2000 codestream declares must not exceed Rows x Columns (the decoders
    allocate from it).
    """
    limit = DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels
    geometry = check_pixel_geometry(ds, limit)
    rows, columns = geometry.rows, geometry.columns
    samples, frames = geometry.samples_per_pixel, geometry.frames
    bits_allocated, bits_stored = geometry.bits_allocated, geometry.bits_stored
    photometric = geometry.photometric
    representation = _int_attribute(ds, "PixelRepresentation", default=0)
    if not photometric:
        raise PreprocessError("missing required attribute Photometric Interpretation (0028,0004)")
    if rows > 65535 or columns > 65535:
        raise PreprocessError(f"invalid image size {rows} x {columns}")
    if samples not in (1, 3):
        raise PreprocessError(f"unsupported Samples per Pixel {samples}")
    if bits_allocated not in (8, 16, 32):
        raise PreprocessError(f"unsupported Bits Allocated {bits_allocated}")
    if not 1 <= bits_stored <= bits_allocated:
        raise PreprocessError(
            f"Bits Stored {bits_stored} is not within 1..Bits Allocated {bits_allocated}"
        )
    if representation not in (0, 1):
        raise PreprocessError(f"invalid Pixel Representation {representation}")
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
        size = _codestream_size(_first_fragment(ds["PixelData"].value, frames))
        if size is not None and size[0] * size[1] > rows * columns:
            raise PreprocessError(
                f"the compressed frame declares {size[0]} x {size[1]} pixels, more than "
                f"Rows x Columns = {rows} x {columns}"
            )
    return geometry


def _first_fragment(value: bytes, frames: int) -> bytes:
    """The start of the first frame of encapsulated Pixel Data (PS3.5 A.4), or b"" if unparsable."""
    from pydicom.encaps import generate_frames

    try:
        return next(generate_frames(value, number_of_frames=frames))[:65536]
    except Exception:  # noqa: BLE001 - malformed items: the decoder will report it
        return b""


# JPEG start-of-frame markers (ITU-T T.81 Table B.1; JPEG-LS SOF55, ITU-T T.87 C.2.2).
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _codestream_size(frame: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 codestream declares; None if unknown."""
    if frame[:4] == b"\xff\x4f\xff\x51" and len(frame) >= 24:
        # JPEG 2000 SOC + SIZ: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz (ISO/IEC 15444-1 A.5.1)
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", frame[8:24])
        return max(ysiz - yosiz, 0), max(xsiz - xosiz, 0)
    if frame[:2] != b"\xff\xd8":
        return None
    pos = 2  # walk the marker segments after SOI up to the frame header (T.81 B.2.2)
    while pos + 9 <= len(frame):
        if frame[pos] != 0xFF:
            return None
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _JPEG_SOF:
            rows, columns = struct.unpack(">HH", frame[pos + 5 : pos + 9])
            return (rows, columns) if rows else None  # 0 rows: defined later by DNL
        pos += 2 + struct.unpack(">H", frame[pos + 2 : pos + 4])[0]
    return None


def _is_encapsulated(ds: Dataset, transfer_syntax: str | None = None) -> bool:
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


# --------------------------------------------------------------------------------------------
# DICOM: decoding and rendering
# --------------------------------------------------------------------------------------------


def _decode_first_frame(ds: Dataset, geometry: PixelGeometry) -> np.ndarray:
    ts = ds.file_meta.get("TransferSyntaxUID")
    ts_name = getattr(ts, "name", str(ts))
    preferred = _PREFERRED_PLUGIN.get(str(ts), "")
    arr: np.ndarray | None = None
    if preferred:
        try:
            arr = _pixel_array_first_frame(ds, preferred)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - the preferred plugin failed: pydicom tries them all
            arr = None
    if arr is None:
        try:
            arr = _pixel_array_first_frame(ds, "")
        except MemoryError:
            raise
        except Exception as exc:  # third-party decoders raise anything; the reason is kept
            reason = " ".join(str(exc).split())
            raise PreprocessError(
                f"cannot decode the pixel data ({ts_name}): {reason[:300]}"
            ) from exc
    expected: tuple[int, ...] = (geometry.rows, geometry.columns)
    if geometry.samples_per_pixel == 3:
        expected = (*expected, 3)
    if arr.shape != expected:
        raise PreprocessError(f"decoded pixel data has shape {arr.shape}, expected {expected}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _pixel_array_first_frame(ds: Dataset, plugin: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # index=0 decodes (and for native data, reads) the first frame only; YBR is
        # converted to RGB by pydicom.
        return pixel_array(ds, index=0, decoding_plugin=plugin)


def dataset_to_uint8(ds: Dataset, max_pixels: int | None = None) -> np.ndarray:
    """Render a DICOM dataset's first frame as 8-bit grayscale (H, W), bone bright.

    Validates first (:func:`check_pixel_data`); raises :class:`PreprocessError`. A dataset
    without File Meta Information (e.g. built in memory) gets the transfer syntax its
    encoding implies, as in :func:`read_dataset`.
    """
    geometry = check_pixel_data(ds, max_pixels)
    _ensure_transfer_syntax(ds)
    arr = _decode_first_frame(ds, geometry)
    if geometry.samples_per_pixel == 3:
        return _color_to_gray(arr)
    _warn_presentation_lut_shape(ds, geometry.photometric)
    return _render_grayscale(arr, ds, geometry)


def dicom_to_uint8(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a DICOM radiograph as 8-bit grayscale (H, W), bone bright."""
    return dataset_to_uint8(read_dataset(path), max_pixels)


def _color_to_gray(rgb: np.ndarray) -> np.ndarray:
    if rgb.dtype == np.uint8:
        # Pillow's own conversion, so a colour picture and its DICOM give identical gray.
        return np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.uint8)
    weights = np.array([19595, 38470, 7471], dtype=np.float64) / 65536.0  # Pillow's luma
    return _range_to_uint8(rgb.astype(np.float64) @ weights)


def _warn_presentation_lut_shape(ds: Dataset, photometric: str) -> None:
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    consistent = {"MONOCHROME1": ("", "INVERSE"), "MONOCHROME2": ("", "IDENTITY")}
    if shape and shape not in consistent[photometric]:
        log.warning(
            "Presentation LUT Shape %s contradicts %s (PS3.3 C.8.11.6); following the "
            "Photometric Interpretation",
            shape,
            photometric,
        )


def _render_grayscale(arr: np.ndarray, ds: Dataset, geometry: PixelGeometry) -> np.ndarray:
    """Stored values -> Modality LUT -> VOI -> MONOCHROME1 inversion -> uint8."""
    render = _Renderer(ds, geometry)
    if np.issubdtype(arr.dtype, np.integer):
        dmin, dmax = int(arr.min()), int(arr.max())
        span = dmax - dmin + 1
        if span <= _MAX_LUT_SPAN:
            # Evaluate the whole chain once per possible value, then one table lookup per
            # pixel: much faster than float arithmetic on millions of pixels.
            index = np.subtract(arr, dmin, dtype=np.int64 if arr.itemsize >= 4 else np.int32)
            domain = np.arange(dmin, dmax + 1, dtype=np.float64)

            def weights() -> np.ndarray:
                # For the window check only: every 2nd row and column is plenty for a 1%
                # criterion and 4x cheaper than the full histogram.
                return np.bincount(index[::2, ::2].ravel(), minlength=span).astype(np.float64)

            def present() -> np.ndarray:
                return np.bincount(index.ravel(), minlength=span) > 0

            table = _to_uint8(render(domain, weights, present))
            return table[index]
    values = arr.astype(np.float64).ravel()
    ones = np.ones(values.shape, dtype=np.float64)
    return _to_uint8(render(values, lambda: ones, lambda: ones > 0)).reshape(arr.shape)


def _to_uint8(unit: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(unit, 0.0, 1.0) * 255.0).astype(np.uint8)


class _Renderer:
    """The grayscale pipeline as a function of stored values (PS3.4 N.2.1, Figure N.2-1).

    Called with the values to transform (every pixel, or every value of a table's domain)
    and two callables, evaluated only when a data-dependent choice needs them: the number of
    pixels holding each value (sampled), and whether a value occurs at all (exact).
    """

    def __init__(self, ds: Dataset, geometry: PixelGeometry) -> None:
        self.ds = ds
        self.geometry = geometry
        self.modality, self.modality_is_linear = _modality_function(ds)

    def __call__(
        self,
        stored: np.ndarray,
        weights: Callable[[], np.ndarray],
        present: Callable[[], np.ndarray],
    ) -> np.ndarray:
        values = self.modality(stored)
        unit = self._voi(stored, values, weights, present)
        # PS3.3 C.7.6.3.1.2: MONOCHROME1 shows the minimum value as white.
        if self.geometry.photometric == "MONOCHROME1":
            unit = 1.0 - unit
        return unit

    def _voi(
        self,
        stored: np.ndarray,
        values: np.ndarray,
        weights: Callable[[], np.ndarray],
        present: Callable[[], np.ndarray],
    ) -> np.ndarray:
        ds = self.ds
        lut_items = ds.get("VOILUTSequence")
        if lut_items:
            try:
                first, table = _read_lut(lut_items[0], ds, self.geometry.signed)
            except PreprocessError as exc:
                log.warning("ignoring unusable VOI LUT Sequence: %s", exc)
            else:
                out = _apply_lut(values, first, table)
                lo, hi = float(table.min()), float(table.max())
                # Normalised by the table's real range, not by its declared bit depth:
                # vendors declare 16 bits over 12-bit tables (e.g. Agfa), which would
                # otherwise render near black.
                return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
        window = _first_window(ds)
        if window is not None:
            center, width, function = window
            counts = weights()
            for shift in self._window_shifts():
                unit = _apply_window(values + shift, center, width, function)
                inside = float(np.sum(counts[(unit > 0.0) & (unit < 1.0)]))
                if inside >= _MIN_WINDOW_FRACTION * float(np.sum(counts)):
                    if shift:
                        log.warning(
                            "window %s/%s does not fit the pixel values; applied to values "
                            "shifted by %+d (signed data stored with an offset)",
                            center,
                            width,
                            shift,
                        )
                    return unit
            log.warning("window %s/%s does not fit the pixel values; ignored", center, width)
        return self._full_range(stored, values, present)

    def _window_shifts(self) -> tuple[int, ...]:
        # The window as given first; then the +/-2^(n-1) offset of signed data stored as
        # unsigned (or the reverse), the only inconsistency seen in practice.
        half = 1 << (self.geometry.bits_stored - 1)
        return (0, -half, half)

    def _full_range(
        self, stored: np.ndarray, values: np.ndarray, present: Callable[[], np.ndarray]
    ) -> np.ndarray:
        """Rendering without any VOI (PS3.3 C.11.2 leaves it to the application)."""
        # The ends of the domain are values that occur (it spans the data's min..max).
        max_stored = float(stored.max())
        bits = self.geometry.bits_stored
        top = (1 << bits) - 1
        if not self.geometry.signed and (bits <= 8 or max_stored >= (top + 1) // 2):
            # The declared depth is in use (8-bit data always is: pictures and secondary
            # captures are display-ready): the whole representable range 0..2^n-1 maps to
            # 0..255, as a display without a VOI does. An 8-bit picture stored as DICOM, or
            # scaled to 12 or 16 bits, thus comes back unchanged.
            every = np.array([0.0, top]) if self.modality_is_linear else np.arange(top + 1.0)
            ends = self.modality(every)
            lo, hi = float(ends.min()), float(ends.max())
        elif self.modality_is_linear:
            # Bits Stored overstates the depth (a 12-bit detector declared as 16 bits) or
            # the data is signed: the values present define the range.
            lo, hi = float(values.min()), float(values.max())
        else:  # through a Modality LUT table: the outputs of the values that occur
            seen = values[present()]
            lo, hi = float(seen.min()), float(seen.max())
        if hi <= lo:
            return np.zeros_like(values)
        return (values - lo) / (hi - lo)


def _modality_function(ds: Dataset) -> tuple[Callable[[np.ndarray], np.ndarray], bool]:
    """Modality LUT Sequence if present, else Rescale Slope/Intercept (PS3.3 C.11.1).

    Returns the function and whether it is linear (rescale) rather than a table.
    """
    items = ds.get("ModalityLUTSequence")
    if items:
        try:
            first, table = _read_lut(items[0], ds, _int_attribute(ds, "PixelRepresentation", 0))
        except PreprocessError as exc:
            log.warning("ignoring unusable Modality LUT Sequence: %s", exc)
        else:
            return (lambda v: _apply_lut(v, first, table)), False
    try:
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
    except (ValueError, TypeError) as exc:
        raise PreprocessError(f"invalid Rescale Slope/Intercept: {exc}") from exc
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0.0:
        raise PreprocessError(f"invalid Rescale Slope/Intercept {slope}/{intercept}")
    if slope == 1.0 and intercept == 0.0:
        return (lambda v: v), True
    return (lambda v: v * slope + intercept), True


def _read_lut(item: Any, ds: Dataset, signed_input: bool | int) -> tuple[int, np.ndarray]:
    """(first mapped value, table) of a Modality or VOI LUT item (PS3.3 C.11.1.1, C.11.2.1.1)."""
    descriptor = item.get("LUTDescriptor")
    if descriptor is None or "LUTData" not in item:
        raise PreprocessError("LUT item without LUT Descriptor or LUT Data")
    try:
        entries, first, bits = (int(x) for x in list(descriptor)[:3])
    except (ValueError, TypeError) as exc:
        raise PreprocessError(f"invalid LUT Descriptor {descriptor!r}") from exc
    entries = entries or 65536  # 0 means 2^16 entries
    if signed_input and first > 32767:
        first -= 65536  # the first mapped value is SS when the input is signed
    raw = item["LUTData"].value
    if isinstance(raw, bytes | bytearray):
        little = ds.original_encoding[1] is not False
        if bits <= 8 and len(raw) < 2 * entries:
            data = np.frombuffer(raw, dtype=np.uint8)  # 8-bit entries packed as bytes
        else:
            data = np.frombuffer(raw[: len(raw) // 2 * 2], dtype="<u2" if little else ">u2")
    else:
        data = np.atleast_1d(np.asarray(raw, dtype=np.int64))
    if data.size < entries:
        raise PreprocessError(f"LUT Data has {data.size} entries, descriptor says {entries}")
    return first, data[:entries].astype(np.float64)


def _apply_lut(values: np.ndarray, first: int, table: np.ndarray) -> np.ndarray:
    # Values below the first entry use the first, above the last use the last.
    index = np.clip(np.rint(values) - first, 0, table.size - 1).astype(np.int64)
    return table[index]


def _first_window(ds: Dataset) -> tuple[float, float, str] | None:
    """The first Window Center/Width pair and the VOI LUT Function (PS3.3 C.11.2.1.2)."""
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None:
        return None
    try:
        c = float(center[0] if _is_multi(center) else center)
        w = float(width[0] if _is_multi(width) else width)
    except (ValueError, TypeError, IndexError):
        log.warning("ignoring invalid Window Center/Width %r/%r", center, width)
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    # LINEAR needs a width of at least 1, the others a positive width (C.11.2.1.2).
    if not (math.isfinite(c) and math.isfinite(w)) or w <= 0 or (function == "LINEAR" and w < 1):
        log.warning("ignoring invalid Window Center/Width %s/%s", c, w)
        return None
    return c, w, function


def _is_multi(value: Any) -> bool:
    return isinstance(value, list | tuple) or type(value).__name__ == "MultiValue"


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The VOI LUT Function to 0..1 (PS3.3 C.11.2.1.2.1, C.11.2.1.3.1, C.11.2.1.3.2)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1.0:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


# --------------------------------------------------------------------------------------------
# Network input
# --------------------------------------------------------------------------------------------


def to_network_input(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize 8-bit grayscale to ``(size, size, 3)`` uint8, the network's input."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise TypeError(f"expected a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    resized = Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(resized, dtype=np.uint8)[:, :, np.newaxis], 3, axis=2)


def is_dicom(path: Path) -> bool:
    """A DICOM file: Part 10 preamble, or a bare dataset (no preamble, no File Meta).

    Picture formats are recognised by their magic numbers; a file that starts with a
    group 0002 or 0008 tag (either byte order) is taken as a bare dataset.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise PreprocessError(f"cannot open {Path(path).name}: {exc.strerror or exc}") from exc
    if head[128:132] == b"DICM":
        return True
    if head.startswith(_PICTURE_MAGIC):
        return False
    if head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return True
    return Path(path).suffix.lower() in {".dcm", ".dicom"}


def load_network_input(path: Path, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Any supported file to the network's input; raises :class:`PreprocessError`."""
    return to_network_input(load_gray_uint8(path, max_pixels), size)


def load_gray_uint8(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Any supported file (DICOM or picture) to 8-bit grayscale (H, W), bone bright."""
    path = Path(path)
    if is_dicom(path):
        return dicom_to_uint8(path, max_pixels)
    return image_to_uint8(path, max_pixels)
