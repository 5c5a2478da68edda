"""Reading files: DICOM (Part 10 or a bare dataset, PS3.10 7.1) or a picture.

:func:`read_dataset` accepts Part 10 files, bare datasets without preamble or File Meta
Information (the transfer syntax is inferred from the encoding pydicom detected; Implicit VR
Little Endian for the usual case, PS3.5 A.1), Deflated and Big Endian. Truncated files, which
pydicom returns as an (almost) empty dataset with only a warning, are refused, and so are
datasets whose elements contradict their transfer syntax's VR encoding.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

from model.imaging.errors import PreprocessError
from model.imaging.pixel_module import has_pixel_data

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

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

_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_LE = "1.2.840.10008.1.2.1"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"


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
    if head[128:132] == b"DICM":  # PS3.10 7.1: 128-byte preamble, then the prefix
        return True
    if head.startswith(_PICTURE_MAGIC):
        return False
    if head[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x02", b"\x00\x08"):
        return True
    return Path(path).suffix.lower() in {".dcm", ".dicom"}


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
    if len(ds) == 0 or not has_pixel_data(ds):
        if truncated:
            raise PreprocessError(
                "DICOM file is truncated: it ends before its Pixel Data (7FE0,0010) is complete"
            )
        raise PreprocessError("DICOM object has no Pixel Data (7FE0,0010)")
    ensure_transfer_syntax(ds)
    return ds


def ensure_transfer_syntax(ds: Dataset) -> None:
    """Give a dataset without Transfer Syntax UID the one its encoding implies (PS3.5 10.1).

    Files without File Meta Information, and datasets built in memory, would otherwise leave
    the pixel decoders guessing; the encoding pydicom detected while reading decides, and
    Implicit VR Little Endian (the DICOM default) when nothing was detected.
    """
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
