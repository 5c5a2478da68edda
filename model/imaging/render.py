"""Rendering a DICOM image to 8-bit grayscale, bone bright (PS3.3 C.11, PS3.4 N.2.1).

:func:`dataset_to_uint8`: check the header (:func:`~model.imaging.pixel_module.check_pixel_data`),
decode the first frame (:mod:`model.imaging.decode`), then the grayscale pipeline of PS3.4
Figure N.2-1 (:func:`render_grayscale`): Modality LUT Sequence, else Rescale
Slope/Intercept (PS3.3 C.11.1); then the first VOI LUT Sequence item, else the first Window
Center/Width pair with its VOI LUT Function (PS3.3 C.11.2, C.11.2.1.2, C.11.2.1.3); then
MONOCHROME1 inverted so that bone is bright (PS3.3 C.7.6.3.1.2); 8 bits. Colour images become
gray with Pillow's own luma weights (:func:`color_to_gray`), so a colour picture and its DICOM
agree.

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
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from model.imaging.decode import decode_first_frame
from model.imaging.errors import PreprocessError
from model.imaging.lut import apply_lut, apply_window, first_window, modality_function, read_lut
from model.imaging.pixel_module import PixelGeometry, check_pixel_data
from model.imaging.read import ensure_transfer_syntax

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

log = logging.getLogger(__name__)

#: A window that leaves fewer pixels than this between black and white is inconsistent.
_MIN_WINDOW_FRACTION = 0.01

# Domains of integer pixel values larger than this are rendered pixel by pixel instead of
# through a lookup table over every possible value.
_MAX_LUT_SPAN = 1 << 20


def dataset_to_uint8(ds: Dataset, max_pixels: int | None = None) -> np.ndarray:
    """Render a DICOM dataset's first frame as 8-bit grayscale (H, W), bone bright.

    Validates first (:func:`check_pixel_data`); raises :class:`PreprocessError`. A dataset
    without File Meta Information (e.g. built in memory) gets the transfer syntax its
    encoding implies, as in :func:`~model.imaging.read.read_dataset`.
    """
    geometry = check_pixel_data(ds, max_pixels)
    ensure_transfer_syntax(ds)
    arr = decode_first_frame(ds, geometry)
    if geometry.samples_per_pixel == 3:
        return color_to_gray(arr)
    warn_presentation_lut_shape(ds, geometry.photometric)
    return render_grayscale(arr, ds, geometry)


def color_to_gray(rgb: np.ndarray) -> np.ndarray:
    """RGB (H, W, 3) -> 8-bit gray (H, W) with ITU-R 601 luma, as Pillow's ``convert("L")``.

    pydicom has already converted YBR (PS3.3 C.7.6.3.1.2) to RGB; deeper than 8-bit colour is
    scaled over the range of its values.
    """
    if rgb.dtype == np.uint8:
        # Pillow's own conversion, so a colour picture and its DICOM give identical gray.
        return np.asarray(Image.fromarray(rgb, "RGB").convert("L"), dtype=np.uint8)
    weights = np.array([19595, 38470, 7471], dtype=np.float64) / 65536.0  # Pillow's luma
    return range_to_uint8(rgb.astype(np.float64) @ weights)


def warn_presentation_lut_shape(ds: Dataset, photometric: str) -> None:
    """Log a Presentation LUT Shape (2050,0020) that contradicts the Photometric Interpretation.

    Nothing else: the shape never adds a second inversion (see the module docstring).
    """
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    consistent = {"MONOCHROME1": ("", "INVERSE"), "MONOCHROME2": ("", "IDENTITY")}
    if shape and shape not in consistent[photometric]:
        log.warning(
            "Presentation LUT Shape %s contradicts %s (PS3.3 C.8.11.6); following the "
            "Photometric Interpretation",
            shape,
            photometric,
        )


def render_grayscale(arr: np.ndarray, ds: Dataset, geometry: PixelGeometry) -> np.ndarray:
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
    # The pipeline's 0..1 output to the 8 bits the network was trained on.
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
        self.modality, self.modality_is_linear = modality_function(ds)

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
                first, table = read_lut(lut_items[0], ds, self.geometry.signed)
            except PreprocessError as exc:
                log.warning("ignoring unusable VOI LUT Sequence: %s", exc)
            else:
                out = apply_lut(values, first, table)
                lo, hi = float(table.min()), float(table.max())
                # Normalised by the table's real range, not by its declared bit depth:
                # vendors declare 16 bits over 12-bit tables (e.g. Agfa), which would
                # otherwise render near black.
                return (out - lo) / (hi - lo) if hi > lo else np.zeros_like(out)
        window = first_window(ds)
        if window is not None:
            center, width, function = window
            counts = weights()
            for shift in self._window_shifts():
                unit = apply_window(values + shift, center, width, function)
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


def range_to_uint8(values: np.ndarray) -> np.ndarray:
    """Values scaled from their own min..max to 0..255 (all zero when constant)."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - lo) * (255.0 / (hi - lo))).astype(np.uint8)
