"""Cached activations of the frozen lower MobileNetV2, over augmented views of every image.

Training fine-tunes only the top of MobileNetV2: every layer after the cut layer
(``block_13_project_BN`` by default: blocks 14-16 and ``Conv_1``; ``block_5_add``: blocks 6-16)
and the head. The layers below never change, so their output is computed once per image and
per augmented view and stored (float16) instead of being recomputed every epoch: the same
fine-tuning, with the same augmentation, at a fraction of the cost on a CPU. The cache records
its cut layer; training and threshold selection read it from there.

Views per image (``views`` = 8 by default):

* view 0 is the exact inference input: ``to_network_input(image_to_uint8(path), size)``;
* views 1.. are (a random subset of) the other 7 rotations by 90 degrees / flips (dihedral
  group D4) of it, each with a random zoom (crop 80-100 %), shift and contrast/brightness
  change (seeded per image).

The pooled ImageNet embedding (frozen top, global average pool) of every view is stored too;
:mod:`model.training.split` uses it to find near-duplicates under rotation and flips.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from model.imaging import PreprocessError, image_to_uint8, to_network_input
from model.training.data import Record, read_all

CUT_LAYER = "block_13_project_BN"
KEYS_FILE = "keys.json"


def split_network(model: Any, base: Any, cut: str = CUT_LAYER) -> tuple[Any, Any]:
    """``(lower, top)`` sharing layers with ``model`` (from :func:`build_classifier`).

    ``lower`` maps 0..255 images to the ``cut`` activations; ``top`` maps those to the fracture
    probability through the very layer objects of ``model``, so training ``top`` trains
    ``model``. ``top`` is rebuilt by replaying MobileNetV2's graph after ``cut``.
    """
    import keras

    names = [layer.name for layer in base.layers]
    idx = names.index(cut)
    lower_base = keras.Model(base.input, base.get_layer(cut).output)
    inp = keras.Input(shape=tuple(model.input.shape[1:]), name="image")
    lower = keras.Model(inp, lower_base(model.get_layer("to_unit_range")(inp)), name="lower")
    feat = keras.Input(shape=tuple(base.get_layer(cut).output.shape[1:]), name="features")
    tensors: dict[str, Any] = {cut: feat}
    for layer in base.layers[idx + 1 :]:
        node = layer._inbound_nodes[0]
        parents = [t._keras_history[0].name for t in node.input_tensors]
        args = [tensors[p] for p in parents]
        tensors[layer.name] = layer(args if len(args) > 1 else args[0])
    x = tensors[base.layers[-1].name]
    pooled = model.get_layer("pool")(x)
    x = model.get_layer("dropout")(pooled)
    out = model.get_layer("fracture_probability")(x)
    top = keras.Model(feat, out, name="top")
    embed = keras.Model(feat, pooled, name="embed")
    return lower, (top, embed)


def dihedral_view(img: np.ndarray, k: int) -> np.ndarray:
    """Transform ``k`` (0..7) of D4: ``k % 4`` quarter turns, mirrored first when ``k >= 4``."""
    if k >= 4:
        img = img[:, ::-1]
    return np.ascontiguousarray(np.rot90(img, k % 4))


def augment(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random zoom (crop 80-100 %, random position = shift) and contrast/brightness."""
    size = img.shape[0]
    frac = rng.uniform(0.8, 1.0)
    crop = max(8, int(round(size * frac)))
    y0 = int(rng.integers(0, size - crop + 1))
    x0 = int(rng.integers(0, size - crop + 1))
    gray = img[y0 : y0 + crop, x0 : x0 + crop, 0]
    gray = np.asarray(
        Image.fromarray(np.ascontiguousarray(gray)).resize((size, size), Image.Resampling.BILINEAR)
    ).astype(np.float32)
    contrast = rng.uniform(0.75, 1.3)
    brightness = rng.uniform(-20, 20)
    mean = gray.mean()
    gray = np.clip((gray - mean) * contrast + mean + brightness, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def make_views(x: np.ndarray, views: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = [x]
    # a random subset of the 7 non-identity D4 transforms when fewer than 8 views are cached
    ks = rng.permutation(np.arange(1, 8))[: views - 1]
    for k in ks:
        out.append(augment(dihedral_view(x, int(k)), rng))
    return np.stack(out)


def _load(rec: Record, size: int) -> np.ndarray | str:
    try:
        return to_network_input(image_to_uint8(rec.path), size)
    except PreprocessError as exc:
        return str(exc)
    except FileNotFoundError as exc:
        return f"missing file: {exc}"


def build_cache(
    records: Sequence[Record],
    out_dir: Path,
    size: int,
    weights: str | Path | None,
    views: int = 8,
    batch_images: int = 8,
    seed: int = 0,
    progress: bool = True,
    cut: str = CUT_LAYER,
) -> dict[str, Any]:
    """Write ``features.npy`` (N, views, h, w, c) float16, ``embeddings.npy`` (N, views, 1280)
    float16 and ``keys.json`` (keys, labels, rejected) under ``out_dir``."""
    import keras

    from model.training.network import build_classifier

    keras.utils.set_random_seed(seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, base = build_classifier(size, weights=weights)
    lower, (_, embed) = split_network(model, base, cut)
    fshape = tuple(int(d) for d in lower.output.shape[1:])
    n = len(records)
    feats = np.lib.format.open_memmap(
        out_dir / "features.npy", mode="w+", dtype=np.float16, shape=(n, views, *fshape)
    )
    embs = np.lib.format.open_memmap(
        out_dir / "embeddings.npy", mode="w+", dtype=np.float16, shape=(n, views, 1280)
    )
    import tensorflow as tf

    run_lower = tf.function(lambda t: lower(t, training=False), reduce_retracing=True)
    run_embed = tf.function(lambda t: embed(t, training=False), reduce_retracing=True)
    rejected: dict[str, str] = {}
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=2) as pool:
        loaded = pool.map(lambda r: _load(r, size), records)
        batch: list[np.ndarray] = []
        index: list[int] = []

        def flush() -> None:
            if not batch:
                return
            x = np.concatenate(batch).astype(np.float32)
            f = run_lower(x)
            e = np.asarray(run_embed(f))
            f = np.asarray(f)
            for j, i in enumerate(index):
                feats[i] = f[j * views : (j + 1) * views].astype(np.float16)
                embs[i] = e[j * views : (j + 1) * views].astype(np.float16)
            batch.clear()
            index.clear()

        for i, (rec, x) in enumerate(zip(records, loaded, strict=True)):
            if isinstance(x, str):
                rejected[rec.key] = x
                feats[i] = 0
                embs[i] = 0
            else:
                batch.append(make_views(x, views, seed * 1_000_003 + i))
                index.append(i)
            if len(batch) >= batch_images:
                flush()
            if progress and (i + 1) % 100 == 0:
                rate = (i + 1) / (time.time() - t0)
                print(
                    f"  cached {i + 1}/{n} images x {views} views, {rate:.1f} img/s, "
                    f"eta {(n - i - 1) / rate / 60:.1f} min",
                    flush=True,
                )
        flush()
    feats.flush()
    embs.flush()
    meta = {
        "size": size,
        "views": views,
        "cut_layer": cut,
        "feature_shape": list(fshape),
        "keys": [r.key for r in records],
        "labels": [r.label for r in records],
        "rejected": rejected,
        "seconds": round(time.time() - t0, 1),
    }
    (out_dir / KEYS_FILE).write_text(json.dumps(meta))
    return meta


class Cache:
    """A feature cache on disk (memory-mapped)."""

    def __init__(self, cache_dir: Path) -> None:
        self.dir = Path(cache_dir)
        self.meta = json.loads((self.dir / KEYS_FILE).read_text())
        self.keys: list[str] = self.meta["keys"]
        self.index = {k: i for i, k in enumerate(self.keys)}
        self.features = np.load(self.dir / "features.npy", mmap_mode="r")
        self.embeddings = np.load(self.dir / "embeddings.npy", mmap_mode="r")
        self.size: int = self.meta["size"]
        self.rejected: dict[str, str] = self.meta["rejected"]
        # caches written before the cut layer was a parameter were all cut at the default
        self.cut_layer: str = self.meta.get("cut_layer", CUT_LAYER)


def main(argv: Sequence[str] | None = None) -> int:
    repo = Path(__file__).resolve().parents[2]
    shared = repo.parent / "shared"
    p = argparse.ArgumentParser(description="Cache frozen MobileNetV2 activations")
    p.add_argument("--bfmr-dir", type=Path, default=shared / "datasets/bone-fracture-multi-region")
    p.add_argument("--fracatlas-dir", type=Path, default=shared / "datasets/fracatlas-train")
    p.add_argument(
        "--weights", default=str(shared / "weights/mobilenet_v2_imagenet_1.0_224_no_top.h5")
    )
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--views", type=int, default=4)
    p.add_argument("--limit", type=int, default=0, help="first N images only (tests)")
    p.add_argument(
        "--cut-layer",
        default=CUT_LAYER,
        help="last frozen MobileNetV2 layer; everything after it is fine-tuned",
    )
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    records = read_all(args.bfmr_dir, args.fracatlas_dir)
    if args.limit:
        records = records[: args.limit]
    meta = build_cache(
        records, args.out, args.size, args.weights, views=args.views, cut=args.cut_layer
    )
    print(f"cached {len(records)} images in {meta['seconds']}s; rejected {len(meta['rejected'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
