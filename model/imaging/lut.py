"""Look-up tables: the Modality LUT and the VOI LUT / window stages (PS3.3 C.11.1, C.11.2).

Each stage is a function of values, so :mod:`model.imaging.render` can evaluate it once per
possible stored value (a table) or per pixel. Unusable LUTs and windows are logged and
dropped, as a display would fall back to no transformation, rather than refusing the image.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from model.imaging.errors import PreprocessError
from model.imaging.pixel_module import int_attribute

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)


def modality_function(ds: Dataset) -> tuple[Callable[[np.ndarray], np.ndarray], bool]:
    """Modality LUT Sequence if present, else Rescale Slope/Intercept (PS3.3 C.11.1).

    Returns the function and whether it is linear (rescale) rather than a table.
    """
    items = ds.get("ModalityLUTSequence")
    if items:
        try:
            first, table = read_lut(items[0], ds, int_attribute(ds, "PixelRepresentation", 0))
        except PreprocessError as exc:
            log.warning("ignoring unusable Modality LUT Sequence: %s", exc)
        else:
            return (lambda v: apply_lut(v, first, table)), False
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


def read_lut(item: Any, ds: Dataset, signed_input: bool | int) -> tuple[int, np.ndarray]:
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


def apply_lut(values: np.ndarray, first: int, table: np.ndarray) -> np.ndarray:
    """A LUT applied to values (PS3.3 C.11.1.1: ``first`` is the first value mapped)."""
    # Values below the first entry use the first, above the last use the last.
    index = np.clip(np.rint(values) - first, 0, table.size - 1).astype(np.int64)
    return table[index]


def first_window(ds: Dataset) -> tuple[float, float, str] | None:
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


def apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """The VOI LUT Function to 0..1 (PS3.3 C.11.2.1.2.1, C.11.2.1.3.1, C.11.2.1.3.2)."""
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    if width == 1.0:
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
