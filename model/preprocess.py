"""One preprocessing function shared by training, evaluation and the worker.

Any supported radiograph (DICOM or picture file) becomes the network's input the way the
training images look: bone bright, 8 bits, resized to a square, 3 channels.
(First version; see issue 3 for the full DICOM handling.)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


class PreprocessError(ValueError):
    """The file cannot be turned into a network input; the reason is meant for users."""


def image_to_uint8(path: Path) -> np.ndarray:
    """Read a PNG/JPEG/GIF picture as 8-bit grayscale (H, W)."""
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError) as exc:
        raise PreprocessError(f"unreadable image {Path(path).name}: {exc}") from exc


def dicom_to_uint8(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a DICOM radiograph as 8-bit grayscale (H, W), bone bright."""
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path, force=True)
    if "PixelData" not in ds:
        raise PreprocessError("no Pixel Data")
    arr = ds.pixel_array.astype(np.float64)
    arr = apply_modality_lut(arr, ds)
    arr = apply_voi_lut(arr, ds, index=0)
    lo, hi = float(arr.min()), float(arr.max())
    out = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        out = 1.0 - out
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def to_network_input(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize 8-bit grayscale to ``(size, size, 3)`` uint8, the network's input."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise TypeError(f"expected a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    resized = Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(resized, dtype=np.uint8)[:, :, np.newaxis], 3, axis=2)


def is_dicom(path: Path) -> bool:
    """DICOM Part 10 preamble, or a bare dataset (no preamble) that pydicom can read."""
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM":
        return True
    return Path(path).suffix.lower() in {".dcm", ".dicom", ""}


def load_network_input(path: Path, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Any supported file to the network's input; raises :class:`PreprocessError`."""
    path = Path(path)
    gray = dicom_to_uint8(path, max_pixels) if is_dicom(path) else image_to_uint8(path)
    return to_network_input(gray, size)
