"""The evidence picture: a rendered radiograph with the network's class activation map over it
and the result burned in as text (what the worker's evidence Secondary Capture shows).

Pure numpy / Pillow, no network. The radiograph is the project's one rendering
(:func:`model.imaging.load_gray_uint8`: 8-bit gray, bone bright); the map (``(h, w)`` logit
units from :meth:`model.inference.Classifier.predict_with_map`, in the image's orientation)
is stretched over the whole image, because the network's input is the whole image resized
to a square. The map is scaled to this image (its lowest value to its highest) and coloured
only in its upper half, yellow to red with opacity growing with the value, so that bone stays
readable everywhere else. The text goes in a black band above the image, never over anatomy.

Bad input: :func:`refusal` names why a picture cannot be made (an image too small to show a
map on, a uniform image, a map that is flat or not finite); :func:`evidence_picture` raises
:class:`EvidenceError` with that reason.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

#: Below this many pixels on a side an image shows no anatomy a map could point at (the
#: 7x7 map's cells would be a few pixels of the source).
MIN_SIDE = 32
#: The picture's longest side: large radiographs are reduced (an RGB capture of a 3000 px
#: radiograph would be 27 MB), small ones enlarged so that the text stays readable.
MAX_SIDE = 1024
MIN_DISPLAY_SIDE = 512
#: The part of the (scaled) map that is coloured, and the strongest colour's opacity.
COLOUR_FROM = 0.5
MAX_OPACITY = 0.55


class EvidenceError(ValueError):
    """No evidence picture can be made of this image; the message says why."""


def refusal(gray: np.ndarray, cam: np.ndarray | None) -> str | None:
    """Why no evidence picture can be made of ``gray`` with ``cam``; None when one can."""
    if cam is None:
        return "the model's export returns no class activation map"
    if gray.ndim != 2 or gray.size == 0:
        return f"the image is not a 2-D gray image (shape {gray.shape})"
    rows, cols = gray.shape
    if min(rows, cols) < MIN_SIDE:
        return (
            f"the image is {cols}x{rows} pixels, smaller than {MIN_SIDE} px on a side: too "
            "small to show where the network looked"
        )
    if int(gray.max()) == int(gray.min()):
        return f"the image is uniform (every pixel {int(gray.min())}): there is nothing to point at"
    if cam.ndim != 2 or not np.isfinite(cam).all():
        return "the class activation map is not a finite 2-D map"
    if float(cam.max() - cam.min()) <= 1e-6:
        return "the class activation map is flat: no region speaks more for a fracture than another"
    return None


def upsample(cam: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Bilinear interpolation of ``cam`` ``(h, w)`` to ``(rows, cols)`` float32, cell centres
    on pixel centres (cell (i, j) covers the same fraction of the picture as of the network's
    square input), as two small matrix products."""

    def weights(n_out: int, n_in: int) -> np.ndarray:
        x = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(x).astype(int)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = (x - lo).astype(np.float32)
        m = np.zeros((n_out, n_in), dtype=np.float32)
        m[np.arange(n_out), lo] += 1 - frac
        m[np.arange(n_out), hi] += frac
        return m

    h, w = cam.shape
    return weights(rows, h) @ cam.astype(np.float32) @ weights(cols, w).T


def display_size(rows: int, cols: int) -> tuple[int, int]:
    """``(rows, cols)`` of the picture: longest side at most :data:`MAX_SIDE` and at least
    :data:`MIN_DISPLAY_SIDE`, aspect kept."""
    longest = max(rows, cols)
    if longest > MAX_SIDE:
        scale = MAX_SIDE / longest
    elif longest < MIN_DISPLAY_SIDE:
        scale = MIN_DISPLAY_SIDE / longest
    else:
        scale = 1.0
    return max(1, round(rows * scale)), max(1, round(cols * scale))


def overlay(gray: np.ndarray, cam: np.ndarray) -> np.ndarray:
    """The radiograph ``(H, W)`` uint8 at display size with the map over it: ``(H', W', 3)``
    uint8. The map is scaled to this image; from :data:`COLOUR_FROM` of its range upwards it
    is coloured yellow to red, more opaque as it rises; below, the radiograph is untouched.
    Raises :class:`EvidenceError` (see :func:`refusal`)."""
    reason = refusal(gray, cam)
    if reason is not None:
        raise EvidenceError(reason)
    rows, cols = display_size(*gray.shape)
    base = Image.fromarray(gray)
    if (rows, cols) != gray.shape:
        base = base.resize((cols, rows), Image.Resampling.BILINEAR, reducing_gap=2.0)
    lo, hi = float(cam.min()), float(cam.max())
    # The colour layer is made at a quarter of the size (the map is smooth: 7x7 cells) and
    # enlarged by Pillow, then composited: a few ms for a 1024 px picture.
    small = (max(1, rows // 4), max(1, cols // 4))
    level = upsample((cam - lo) / (hi - lo), *small)
    t = np.clip((level - COLOUR_FROM) / (1.0 - COLOUR_FROM), 0.0, 1.0)
    alpha = MAX_OPACITY * t  # 0 at COLOUR_FROM: the colour fades in, no hard edge
    layer = np.empty((*small, 4), dtype=np.uint8)
    layer[..., 0] = 255
    layer[..., 1] = np.round(255.0 * (1.0 - t))
    layer[..., 2] = 0
    layer[..., 3] = np.round(255.0 * alpha)
    colour = Image.fromarray(layer).resize((cols, rows), Image.Resampling.BILINEAR)
    picture = Image.alpha_composite(base.convert("RGBA"), colour).convert("RGB")
    return np.asarray(picture, dtype=np.uint8)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    # Pillow's bundled font (FreeType builds); the bitmap default elsewhere
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ValueError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def with_caption(picture: np.ndarray, lines: Sequence[str]) -> np.ndarray:
    """``picture`` ``(H, W, 3)`` uint8 with a black band above it holding ``lines`` in white."""
    cols = picture.shape[1]
    size = max(11, cols // 48)
    font = _font(size)
    band = (size + size // 3) * len(lines) + size // 2
    canvas = Image.new("RGB", (cols, picture.shape[0] + band), (0, 0, 0))
    canvas.paste(Image.fromarray(picture), (0, band))
    draw = ImageDraw.Draw(canvas)
    y = size // 4
    for line in lines:
        draw.text((size // 2, y), line, fill=(255, 255, 255), font=font)
        y += size + size // 3
    return np.asarray(canvas, dtype=np.uint8)


def evidence_picture(gray: np.ndarray, cam: np.ndarray | None, lines: Sequence[str]) -> np.ndarray:
    """The evidence picture ``(H, W, 3)`` uint8: :func:`overlay` under a caption of
    ``lines``. Raises :class:`EvidenceError` naming why when it cannot be made."""
    reason = refusal(gray, cam)
    if reason is not None or cam is None:
        raise EvidenceError(reason or "no map")
    return with_caption(overlay(gray, cam), lines)
