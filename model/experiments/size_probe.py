"""Does a larger input than 224 help? A linear probe on frozen ImageNet features at two sizes.

Fractures are small, so more pixels might help; MobileNetV2's ImageNet weights were learnt at
224. The probe fits the same logistic regression (balanced classes) on the pooled features of
the same training images at each size and compares AUROC on the validation split (never the
test split), with a paired bootstrap interval for the difference.

``python -m model.experiments.size_probe --cache CACHE_224 --split model/splits/split_v1.csv \
--size 320``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from model.imaging import image_to_uint8, to_network_input
from model.training.data import read_all
from model.training.features import Cache
from model.training.split import read_split_csv


def pooled_features(paths: Sequence[Path], size: int, weights: str) -> np.ndarray:
    import keras
    import tensorflow as tf

    from model.training.features import split_network
    from model.training.network import build_classifier

    model, base = build_classifier(size, weights=weights)
    lower, (_, embed) = split_network(model, base)
    run = tf.function(lambda t: embed(lower(t, training=False), training=False))
    out = []
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=2) as pool:
        images = pool.map(lambda p: to_network_input(image_to_uint8(p), size), paths)
        batch: list[np.ndarray] = []
        for i, img in enumerate(images):
            batch.append(img)
            if len(batch) == 32 or i == len(paths) - 1:
                out.append(np.asarray(run(np.stack(batch).astype(np.float32))))
                batch = []
            if (i + 1) % 200 == 0:
                print(f"  {size}px: {i + 1}/{len(paths)} ({time.time() - t0:.0f}s)", flush=True)
    del keras
    return np.concatenate(out)


def probe(x_tr: np.ndarray, y_tr: np.ndarray, x_va: np.ndarray) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(
        StandardScaler(), LogisticRegression(C=0.05, class_weight="balanced", max_iter=3000)
    )
    clf.fit(x_tr, y_tr)
    return np.asarray(clf.predict_proba(x_va)[:, 1])


def main(argv: Sequence[str] | None = None) -> int:
    from sklearn.metrics import roc_auc_score

    repo = Path(__file__).resolve().parents[2]
    shared = repo.parent / "shared"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bfmr-dir", type=Path, default=shared / "datasets/bone-fracture-multi-region")
    p.add_argument("--fracatlas-dir", type=Path, default=shared / "datasets/fracatlas-train")
    p.add_argument(
        "--weights", default=str(shared / "weights/mobilenet_v2_imagenet_1.0_224_no_top.h5")
    )
    p.add_argument("--cache", type=Path, required=True, help="224 feature cache")
    p.add_argument("--split", type=Path, default=repo / "model/splits/split_v1.csv")
    p.add_argument("--size", type=int, default=320)
    p.add_argument("--n-train", type=int, default=1200)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    records = {r.key: r for r in read_all(args.bfmr_dir, args.fracatlas_dir)}
    table = read_split_csv(args.split)
    cache = Cache(args.cache)
    rng = np.random.default_rng(args.seed)
    train = [k for k, (_, s) in table.items() if s == "train"]
    train = sorted(rng.permutation(train)[: args.n_train].tolist())
    val = sorted(k for k, (_, s) in table.items() if s == "val")
    y_tr = np.array([records[k].label for k in train])
    y_va = np.array([records[k].label for k in val])
    e224 = np.asarray(cache.embeddings[:, 0], dtype=np.float32)
    x224_tr = e224[[cache.index[k] for k in train]]
    x224_va = e224[[cache.index[k] for k in val]]
    t0 = time.time()
    big = pooled_features([records[k].path for k in train + val], args.size, args.weights)
    xb_tr, xb_va = big[: len(train)], big[len(train) :]
    p224 = probe(x224_tr, y_tr, x224_va)
    pbig = probe(xb_tr, y_tr, xb_va)
    auc224, aucbig = roc_auc_score(y_va, p224), roc_auc_score(y_va, pbig)
    diffs = []
    for _ in range(1000):
        idx = rng.integers(0, len(y_va), len(y_va))
        if y_va[idx].min() == y_va[idx].max():
            continue
        diffs.append(roc_auc_score(y_va[idx], pbig[idx]) - roc_auc_score(y_va[idx], p224[idx]))
    result = {
        "method": "logistic regression on frozen ImageNet MobileNetV2 pooled features (view 0)",
        "train_images": len(train),
        "val_images": len(val),
        "val_auroc": {"224": round(float(auc224), 4), str(args.size): round(float(aucbig), 4)},
        "difference": round(float(aucbig - auc224), 4),
        "difference_95ci": [round(float(np.percentile(diffs, q)), 4) for q in (2.5, 97.5)],
        "seconds_feature_extraction": round(time.time() - t0, 1),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
