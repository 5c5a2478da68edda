"""Preview images for the study page: rendered once from the stored object, cached on disk.

Rendering is the project's one function (``model.imaging.dicom_to_uint8``: Modality LUT,
VOI LUT or window, MONOCHROME1 inverted, PS3.4 N.2.1), the same pixels the classifier is
given before resizing; only the screen-sized downscale happens here. The cache holds patient
data: its folder and files are readable by the node's user only.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image

from db.models import Instance
from model.imaging import PreprocessError, dicom_to_uint8


def preview_path(cache_dir: Path, instance: Instance, size: int) -> Path:
    """One file per stored content and size (a ``keep-newest`` re-send renders again)."""
    content = (instance.content_sha256 or "unversioned")[:16]
    return cache_dir / f"{instance.sop_instance_uid}-{content}-{size}.png"


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
    gray = dicom_to_uint8(source, max_pixels=max_pixels)
    picture = Image.fromarray(gray)
    picture.thumbnail((size, size), Image.Resampling.LANCZOS)
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


__all__ = ["PreprocessError", "preview_path", "render_preview"]
