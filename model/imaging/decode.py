"""Decoding the first frame of Pixel Data (PS3.5 8.2: the compressed transfer syntaxes).

pydicom 3 with the pylibjpeg, pyjpegls and RLE plugins; the 12-bit JPEG Extended process is
decoded by pylibjpeg-libjpeg only. Only the first frame is decoded: the network sees one
image, and a multi-frame object's other frames would only cost memory.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np

from model.imaging.errors import PreprocessError, is_decoder_panic
from model.imaging.pixel_module import PixelGeometry

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

# CharLS (pyjpegls) decodes JPEG-LS 3-4x faster than libjpeg (pylibjpeg), which pydicom
# would try first; measured 54 vs 186 ms on a 1760x1760 CR. Other syntaxes: pydicom's order
# (12-bit JPEG Extended is decoded by pylibjpeg-libjpeg only; Pillow and GDCM refuse it).
_PREFERRED_PLUGIN = {
    "1.2.840.10008.1.2.4.80": "pyjpegls",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": "pyjpegls",  # JPEG-LS Near-Lossless
}


def decode_first_frame(ds: Dataset, geometry: PixelGeometry) -> np.ndarray:
    """The first frame as an array of stored values, (Rows, Columns[, 3]), native byte order.

    ``geometry`` comes from :func:`model.imaging.pixel_module.check_pixel_data`, so nothing
    is decoded before the header was checked; raises :class:`PreprocessError` when no decoder
    can read the data or the result does not have the declared shape.
    """
    ts = ds.file_meta.get("TransferSyntaxUID")
    ts_name = getattr(ts, "name", str(ts))
    preferred = _PREFERRED_PLUGIN.get(str(ts), "")
    arr: np.ndarray | None = None
    if preferred:
        try:
            arr = _pixel_array_first_frame(ds, preferred)
        except MemoryError:
            raise
        except Exception:  # noqa: BLE001 - the preferred plugin failed: let pydicom try all
            arr = None
        except BaseException as exc:
            # A Rust decoder's panic is a verdict on the data, not a request to stop.
            if not is_decoder_panic(exc):
                raise
            raise _panic_error(ts_name, exc) from exc
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
        except BaseException as exc:
            if not is_decoder_panic(exc):  # KeyboardInterrupt, SystemExit: not ours to keep
                raise
            raise _panic_error(ts_name, exc) from exc
    expected: tuple[int, ...] = (geometry.rows, geometry.columns)
    if geometry.samples_per_pixel == 3:
        expected = (*expected, 3)
    if arr.shape != expected:
        raise PreprocessError(f"decoded pixel data has shape {arr.shape}, expected {expected}")
    if not arr.dtype.isnative:
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _panic_error(ts_name: str, exc: BaseException) -> PreprocessError:
    """The failure of a decoder that panicked: corrupt data (e.g. RLE segment offsets that
    make pylibjpeg-rle index past its frame, PS3.5 G.5), reported like any decoding error."""
    reason = " ".join(str(exc).split())
    return PreprocessError(
        f"cannot decode the pixel data ({ts_name}): the decoder crashed on corrupt data "
        f"(PanicException: {reason[:300]})"
    )


def _pixel_array_first_frame(ds: Dataset, plugin: str) -> np.ndarray:
    from pydicom.pixels import pixel_array

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # index=0 decodes (and for native data, reads) the first frame only; YBR is
        # converted to RGB by pydicom.
        return pixel_array(ds, index=0, decoding_plugin=plugin)
