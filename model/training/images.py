"""A decoded-image cache for end-to-end training.

Decoding FracAtlas' 640 px JPEGs and the bone fracture set's PNGs every epoch would cost more
than the network's own forward pass on two cores, so every image is decoded once through the
shared preprocessing (:func:`model.imaging.image_to_uint8`, exactly what the node runs) and kept
as 8-bit grayscale:

* training images resized to ``margin * size`` square (``to_network_input``'s own bilinear
  resize, only larger), so that random zoom and crop in :mod:`model.training.augment` sample
  from more pixels than the network's input has;
* validation and test images as the exact network input at ``size`` (one channel of
  :func:`model.imaging.to_network_input`), so a validation figure is the node's figure.

The cache is an ``.npz`` per split plus ``meta.json``; it is rebuilt when the data set
manifests, the split file or the sizes change.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.imaging import PreprocessError, image_to_uint8, to_network_input
from model.training.data import Record, integrity_problem

CACHE_VERSION = 1


@dataclass(frozen=True)
class Split:
    """One split's images (``n, side, side`` uint8 grayscale) and what they are."""

    keys: list[str]
    sources: list[str]
    images: np.ndarray
    labels: np.ndarray


def _decode(job: tuple[str, int]) -> np.ndarray | str:
    path, side = job
    problem = integrity_problem(Path(path))
    if problem:
        return problem
    try:
        return to_network_input(image_to_uint8(Path(path)), side)[:, :, 0]
    except (PreprocessError, OSError) as exc:
        return str(exc)


def _build(records: Sequence[Record], side: int, workers: int) -> tuple[Split, dict[str, str]]:
    jobs = [(str(r.path), side) for r in records]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        decoded = list(pool.map(_decode, jobs, chunksize=16))
    keep, rejected = [], {}
    for rec, out in zip(records, decoded, strict=True):
        if isinstance(out, str):
            rejected[rec.key] = out
        else:
            keep.append((rec, out))
    images = np.stack([img for _, img in keep]) if keep else np.zeros((0, side, side), np.uint8)
    split = Split(
        keys=[r.key for r, _ in keep],
        sources=[r.source for r, _ in keep],
        images=images,
        labels=np.array([r.label for r, _ in keep], dtype=np.int64),
    )
    return split, rejected


def load_or_build(
    cache_dir: Path,
    sets: dict[str, list[Record]],
    size: int,
    margin: float,
    fingerprint: dict[str, Any],
    workers: int = 2,
) -> tuple[dict[str, Split], dict[str, str]]:
    """The cached splits for ``sets`` (train at ``round(margin * size)``, others at ``size``),
    building them when the cache is missing or was made from other data; also returns the
    rejected files with the reason each could not be decoded."""
    train_side = int(round(size * margin))
    meta = {
        "version": CACHE_VERSION,
        "size": size,
        "train_side": train_side,
        "fingerprint": fingerprint,
        "counts": {k: len(v) for k, v in sets.items()},
    }
    meta_path = cache_dir / "meta.json"
    if meta_path.is_file():
        old = json.loads(meta_path.read_text())
        if {k: old.get(k) for k in meta} == meta:
            out = {}
            for name in sets:
                with np.load(cache_dir / f"{name}.npz", allow_pickle=False) as z:
                    out[name] = Split(list(z["keys"]), list(z["sources"]), z["images"], z["labels"])
            return out, dict(old.get("rejected", {}))
    cache_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    out, rejected = {}, {}
    for name, recs in sets.items():
        side = train_side if name == "train" else size
        split, bad = _build(recs, side, workers)
        out[name] = split
        rejected.update(bad)
        np.savez(
            cache_dir / f"{name}.npz",
            keys=np.array(split.keys),
            sources=np.array(split.sources),
            images=split.images,
            labels=split.labels,
        )
        print(f"cache: {name} {len(split.keys)} images at {side} px", flush=True)
    meta["rejected"] = rejected
    meta["seconds"] = round(time.time() - t0, 1)
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return out, rejected
