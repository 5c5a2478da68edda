"""Look-up tables: the Modality LUT and the VOI LUT / window stages (PS3.3 C.11.1, C.11.2).

Each stage is a function of values, so :mod:`model.imaging.render` can evaluate it once per
possible stored value (a table) or per pixel. Unusable LUT Sequences are logged and
dropped, as a display would fall back to no transformation. A Window Center/Width pair or a
Rescale Slope/Intercept that is present but invalid (Window Width below 1, or not above 0 for
LINEAR_EXACT/SIGMOID, PS3.3 C.11.2.1.2 and C.11.2.1.3; NaN or infinite values; Rescale Slope
0, which maps every pixel to one value) refuses the image with a :class:`PreprocessError`
naming the attribute: a substitute rendering would get a probability for an image the
sender never meant to be seen that way.
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
    slope = _decimal(ds, "RescaleSlope", "Rescale Slope (0028,1053)", 1.0)
    intercept = _decimal(ds, "RescaleIntercept", "Rescale Intercept (0028,1052)", 0.0)
    if slope == 0.0:
        # Absent means 1 (an empty value too), but an explicit 0 maps every stored value to
        # the intercept: a uniform image the network would still give a probability for.
        raise PreprocessError(
            "invalid Rescale Slope (0028,1053): 0 maps every pixel to one value (PS3.3 C.11.1)"
        )
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


def _decimal(ds: Dataset, keyword: str, label: str, default: float) -> float:
    """A finite number (DS, PS3.5 6.2), ``default`` when absent or empty; else refused.

    The message names the attribute and says what is wrong, without quoting the value: an
    unparseable text could be anything the sender put there.
    """
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return default
        number = float(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise PreprocessError(f"invalid {label}: not a number") from exc
    if not math.isfinite(number):
        raise PreprocessError(f"invalid {label}: {number} is not a finite number")
    return number


def first_window(ds: Dataset) -> tuple[float, float, str] | None:
    """The first Window Center/Width pair and the VOI LUT Function (PS3.3 C.11.2.1.2).

    ``None`` when the pair is absent (the rendering then uses no VOI). A pair that is present
    but unusable is refused with :class:`PreprocessError` rather than ignored: Window Width
    must be at least 1 (greater than 0 for LINEAR_EXACT and SIGMOID, C.11.2.1.3), and NaN or
    infinite values are no numbers at all. Such a header says the sender's rendering is
    broken; classifying a substitute rendering would report a probability for an image
    nobody was meant to see (the storage SCP still stores the object: see
    ``dicom_node.validate``).
    """
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    try:
        c = float(center[0] if _is_multi(center) else center)
        w = float(width[0] if _is_multi(width) else width)
    except (ValueError, TypeError, IndexError, OverflowError) as exc:
        raise PreprocessError(
            "invalid Window Center (0028,1050) / Window Width (0028,1051): not a number"
        ) from exc
    if not math.isfinite(c):
        raise PreprocessError(f"invalid Window Center (0028,1050): {c} is not a finite number")
    if not math.isfinite(w):
        raise PreprocessError(f"invalid Window Width (0028,1051): {w} is not a finite number")
    function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    # LINEAR needs a width of at least 1 (C.11.2.1.2.1), the others a positive width.
    if function == "LINEAR" and w < 1:
        raise PreprocessError(
            f"invalid Window Width (0028,1051): {w} (PS3.3 C.11.2.1.2 requires at least 1)"
        )
    if w <= 0:
        raise PreprocessError(
            f"invalid Window Width (0028,1051): {w} ({function} requires more than 0, "
            "PS3.3 C.11.2.1.3)"
        )
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
