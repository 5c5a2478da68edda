"""Re-choose an artifact's operating threshold on its validation data (cached features).

``python -m model.threshold --model DIR --cache CACHE [--split-mode ...]``: the same rule as
training (:func:`model.metrics.threshold_for_sensitivity`), for artifacts trained before the
rule changed. Only validation data is used.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.artifact import MODEL_FILE, ModelCard, read_card, write_card
from model.data import integrity_problem, read_all
from model.features import Cache, split_network
from model.metrics import binary_metrics, threshold_for_sensitivity
from model.train import select


def main(argv: Sequence[str] | None = None) -> int:
    import keras

    repo = Path(__file__).resolve().parent.parent
    shared = repo.parent / "shared" / "datasets"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--cache", type=Path, required=True)
    p.add_argument("--bfmr-dir", type=Path, default=shared / "bone-fracture-multi-region")
    p.add_argument("--fracatlas-dir", type=Path, default=shared / "fracatlas-train")
    p.add_argument("--split", type=Path, default=repo / "model/splits/split_v1.csv")
    p.add_argument("--split-mode", choices=("leakage-free", "original"), default="leakage-free")
    args = p.parse_args(argv)
    card = read_card(args.model)
    target = card.extra["training"]["target_sensitivity"]
    records = read_all(args.bfmr_dir, args.fracatlas_dir)
    val = select(records, args.split_mode, args.split)["val"]
    cache = Cache(args.cache)
    bad = {r.key for r in records if r.key in set(val) and integrity_problem(r.path)}
    idx = sorted(cache.index[k] for k in val if k not in cache.rejected and k not in bad)
    y = np.array([cache.meta["labels"][i] for i in idx])
    model = keras.models.load_model(args.model / MODEL_FILE, compile=False)
    base = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    _, (top, _) = split_network(model, base, cache.cut_layer)
    prob = top.predict(np.asarray(cache.features[idx][:, 0], np.float32), verbose=0).ravel()
    threshold = threshold_for_sensitivity(y, prob, target)
    extra = dict(card.extra)
    extra["metrics"] = {**extra.get("metrics", {}), "val": binary_metrics(y, prob, threshold)}
    extra["metrics"].pop("test_cached", None)
    write_card(
        args.model, ModelCard(**{**card.__dict__, "threshold": round(threshold, 6), "extra": extra})
    )
    print(
        json.dumps(
            {"old": card.threshold, "new": round(threshold, 6), "val": extra["metrics"]["val"]}
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
