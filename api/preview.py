"""Preview and evidence images for the study page: rendered once, cached on disk.

Rendering is the project's one function (``model.imaging.dicom_to_uint8``: Modality LUT,
VOI LUT or window, MONOCHROME1 inverted, PS3.4 N.2.1), the same pixels the classifier is
given before resizing; only the screen-sized downscale happens here. The evidence image is
the worker's evidence Secondary Capture (``worker.evidence``: that same rendering with the
class activation map over it and the result burned in), decoded through the project's
reader and checks (``model.imaging``: PS3.3 C.7.6.3 Image Pixel module, first frame) and
kept in colour; it gets the same screen size rule and cache. The cache holds patient data:
its folder and files are readable by the node's user only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from db.models import Evidence, Instance
from model.imaging import PreprocessError, dicom_to_uint8
from model.imaging.decode import decode_first_frame
from model.imaging.pixel_module import check_pixel_data
from model.imaging.read import ensure_transfer_syntax, read_dataset


def preview_path(cache_dir: Path, instance: Instance, size: int) -> Path:
    """One file per stored content and size (a ``keep-newest`` re-send renders again)."""
    content = (instance.content_sha256 or "unversioned")[:16]
    return cache_dir / f"{instance.sop_instance_uid}-{content}-{size}.png"


def evidence_path(cache_dir: Path, evidence: Evidence, size: int) -> Path:
    """One file per capture and size: a capture's SOP Instance UID names one content (a new
    result makes a new capture with a new UID)."""
    return cache_dir / f"evidence-{evidence.sop_instance_uid or evidence.id}-{size}.png"


def _cached_png(target: Path, pixels: np.ndarray, size: int) -> Path:
    """Write ``pixels`` (gray ``(H, W)`` or RGB ``(H, W, 3)`` uint8), longest side at most
    ``size``, to ``target`` as PNG atomically; return ``target``."""
    picture = Image.fromarray(pixels)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
    cache_dir = target.parent
    cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Written beside its final name and renamed: a reader never sees half a PNG, and two
    # requests rendering at once both end with a whole file.
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".preview-", suffix=".png")
    try:
        with os.fdopen(fd, "wb") as handle:
            picture.save(handle, format="PNG", optimize=False)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def render_preview(
    instance: Instance, cache_dir: Path, size: int, max_pixels: int | None = None
) -> Path:
    """The cached PNG of ``instance``, rendered now if it is not there yet.

    Raises ``FileNotFoundError`` when the stored object is gone, ``PreprocessError`` when
    its pixels cannot be rendered (the reason the classifier gave too).
    """
    target = preview_path(cache_dir, instance, size)
    if target.is_file():
        return target
    source = Path(instance.storage_path)
    if not source.is_file():
        raise FileNotFoundError(f"the stored object of {instance.sop_instance_uid} is missing")
    return _cached_png(target, dicom_to_uint8(source, max_pixels=max_pixels), size)


def evidence_pixels(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """The evidence capture's picture: RGB ``(H, W, 3)`` uint8 (gray ``(H, W)`` rendered by
    ``dicom_to_uint8`` for a capture that is not colour). Raises ``PreprocessError``."""
    ds = read_dataset(path)
    geometry = check_pixel_data(ds, max_pixels)
    if geometry.samples_per_pixel != 3 or int(ds.get("BitsAllocated", 0)) != 8:
        return dicom_to_uint8(path, max_pixels=max_pixels)
    ensure_transfer_syntax(ds)
    return np.ascontiguousarray(decode_first_frame(ds, geometry), dtype=np.uint8)


def render_evidence(
    evidence: Evidence, cache_dir: Path, size: int, max_pixels: int | None = None
) -> Path:
    """The cached PNG of a produced evidence capture, rendered now if it is not there yet.

    Raises ``FileNotFoundError`` when the capture's file is gone (removed by retention),
    ``PreprocessError`` when it cannot be decoded.
    """
    target = evidence_path(cache_dir, evidence, size)
    if target.is_file():
        return target
    source = Path(evidence.path or "")
    if not evidence.path or not source.is_file():
        raise FileNotFoundError(f"the evidence capture {evidence.sop_instance_uid} is missing")
    return _cached_png(target, evidence_pixels(source, max_pixels), size)


__all__ = [
    "PreprocessError",
    "evidence_path",
    "preview_path",
    "render_evidence",
    "render_preview",
]
