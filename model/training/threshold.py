"""Re-choose an artifact's operating threshold on its validation data, through the shipped
inference path.

``python -m model.training.threshold --model DIR [--split-mode ...] [--tta none|d4]``: every
validation file goes through :class:`model.inference.Classifier` exactly as the worker runs it
(shared preprocessing, the saved network, and the test-time augmentation written into the card
with ``--tta``), and the same rule as training
(:func:`model.training.metrics.threshold_for_sensitivity`) picks the threshold.
Only validation data is used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.artifact import TEST_TIME_AUGMENTATIONS, read_card, write_card
from model.inference import Classifier, ImageError
from model.training.data import integrity_problem, read_all
from model.training.export import export
from model.training.metrics import binary_metrics, threshold_for_sensitivity
from model.training.train import select


def rechoose(
    model_dir: Path,
    bfmr_dir: Path,
    fracatlas_dir: Path,
    split: Path,
    split_mode: str = "leakage-free",
    tta: str | None = None,
) -> dict[str, Any]:
    """Re-choose ``model_dir``'s threshold on its validation files (setting the card's
    test-time augmentation to ``tta`` first, when given); rewrites the card and returns
    ``{"old", "new", "test_time_augmentation", "val"}``."""
    card = read_card(model_dir)
    if tta is not None:
        card = dataclasses.replace(card, test_time_augmentation=tta)
        write_card(model_dir, card)
    # the threshold is chosen through the export the node will load, so it is (re)made here,
    # with the augmentation the card now names
    card = export(model_dir)
    target = card.extra["training"]["target_sensitivity"]
    records = read_all(bfmr_dir, fracatlas_dir)
    val = set(select(records, split_mode, split)["val"])
    clf = Classifier.load(model_dir)
    labels, probs = [], []
    for rec in records:
        if rec.key not in val or integrity_problem(rec.path):
            continue
        try:
            probs.append(clf.predict(clf.prepare(rec.path)))
        except ImageError:
            continue  # unreadable images never trained or validated either
        labels.append(rec.label)
    y, prob = np.array(labels), np.array(probs)
    threshold = threshold_for_sensitivity(y, prob, target)
    extra = dict(card.extra)
    extra["metrics"] = {**extra.get("metrics", {}), "val": binary_metrics(y, prob, threshold)}
    extra["metrics"].pop("test_cached", None)
    write_card(
        model_dir,
        dataclasses.replace(card, threshold=round(float(threshold), 6), extra=extra),
    )
    return {
        "old": card.threshold,
        "new": round(float(threshold), 6),
        "test_time_augmentation": card.test_time_augmentation,
        "val": extra["metrics"]["val"],
    }


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """The data set, split and split-mode options (shared with model.experiments.ensemble)."""
    repo = Path(__file__).resolve().parents[2]
    shared = repo.parent / "shared" / "datasets"
    p.add_argument("--bfmr-dir", type=Path, default=shared / "bone-fracture-multi-region")
    p.add_argument("--fracatlas-dir", type=Path, default=shared / "fracatlas-train")
    p.add_argument("--split", type=Path, default=repo / "model/splits/split_v1.csv")
    p.add_argument("--split-mode", choices=("leakage-free", "original"), default="leakage-free")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    add_data_arguments(p)
    p.add_argument(
        "--tta", choices=TEST_TIME_AUGMENTATIONS, default=None, help="set the card's TTA first"
    )
    args = p.parse_args(argv)
    result = rechoose(
        args.model, args.bfmr_dir, args.fracatlas_dir, args.split, args.split_mode, args.tta
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
