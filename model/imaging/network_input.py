"""The network's input from any supported file: 8-bit gray, bone bright, square, 3 channels.

Any radiograph (DICOM or picture file) becomes the input the way the training images look:
DICOM through :func:`~model.imaging.render.dataset_to_uint8`, pictures through Pillow, then
resized to a square and repeated to 3 channels (:func:`to_network_input`), exactly alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from model.imaging.errors import PreprocessError
from model.imaging.pixel_module import DEFAULT_MAX_PIXELS
from model.imaging.read import is_dicom, read_dataset
from model.imaging.render import dataset_to_uint8, range_to_uint8


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
                return range_to_uint8(np.asarray(im, dtype=np.float64))
            return np.asarray(im.convert("L"), dtype=np.uint8)
    except PreprocessError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise PreprocessError(f"unreadable image {name}: {exc}") from exc


def dicom_to_uint8(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a DICOM radiograph as 8-bit grayscale (H, W), bone bright (PS3.10 file)."""
    return dataset_to_uint8(read_dataset(path), max_pixels)


def load_gray_uint8(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """Any supported file (DICOM or picture) to 8-bit grayscale (H, W), bone bright."""
    path = Path(path)
    if is_dicom(path):
        return dicom_to_uint8(path, max_pixels)
    return image_to_uint8(path, max_pixels)


def to_network_input(gray: np.ndarray, size: int) -> np.ndarray:
    """Resize 8-bit grayscale to ``(size, size, 3)`` uint8, the network's input."""
    if gray.dtype != np.uint8 or gray.ndim != 2:
        raise TypeError(f"expected a 2-D uint8 image, got {gray.dtype} {gray.shape}")
    resized = Image.fromarray(gray).resize((size, size), Image.Resampling.BILINEAR)
    return np.repeat(np.asarray(resized, dtype=np.uint8)[:, :, np.newaxis], 3, axis=2)


def load_network_input(path: Path, size: int, max_pixels: int | None = None) -> np.ndarray:
    """Any supported file to the network's input; raises :class:`PreprocessError`."""
    return to_network_input(load_gray_uint8(path, max_pixels), size)
