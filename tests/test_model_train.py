"""Training smoke run on a few dozen real images: the loss falls, the artifact saves and reloads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from model.artifact import MODEL_FILE, read_card
from model.inference import Classifier
from tests.conftest import REPO, SHARED, require

#: Left out of the fast tier: a training run (TensorFlow).
pytestmark = pytest.mark.slow

WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_1.0_224_no_top.h5"
SPLIT = REPO / "model" / "splits" / "split_v1.csv"


@pytest.mark.timeout(300)
def test_training_smoke_run(tmp_path: Path) -> None:
    from model.training import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(
        [
            "--bfmr-dir", str(require(SHARED / "datasets/bone-fracture-multi-region")),
            "--fracatlas-dir", str(require(SHARED / "datasets/fracatlas-train")),
            "--weights", str(require(WEIGHTS)),
            "--split", str(require(SPLIT)),
            "--out", str(tmp_path / "artifact"),
            "--size", "96",
            "--views", "2",
            "--cut-layer", "block_5_add",
            "--limit", "12",
            "--head-epochs", "5",
            "--epochs", "2",
            "--patience", "10",
            "--batch-size", "8",
            "--lr-head", "0.01",
            "--version", "smoke",
        ]
    )  # fmt: skip
    result = train.train(args)
    history = result["history"]
    head = [h["loss"] for h in history if h["phase"] == "frozen-base"]
    assert len(head) == 5 and head[-1] < head[0], head
    assert any(h["phase"] == "fine-tune" for h in history)

    out = tmp_path / "artifact"
    assert (out / MODEL_FILE).stat().st_size > 1_000_000
    card = read_card(out)
    assert card.input_size == 96 and card.version == "smoke"
    assert card.uid.startswith("2.25.") and 0.0 <= card.threshold <= 1.0
    assert card.extra["training"]["split_file_sha256"]
    # the shipped recipe's depth: everything from block 6 up is fine-tuned
    assert card.extra["training"]["finetuned_from_layer"] == "block_6_expand"
    # the saved whole network answers as the cached-activation path that was trained
    assert card.extra["training"]["cache_parity_max_abs_diff"] < 0.01
    assert json.loads((out / "history.json").read_text()) == history

    clf = Classifier.load(out)
    image = next((SHARED / "datasets/fracatlas-train/images").glob("*.jpg"))
    pred = clf.classify_file(image)
    assert 0.0 <= pred.probability <= 1.0
    # a second load of the file gives the same answer
    again = Classifier.load(out).classify_file(image)
    assert abs(again.probability - pred.probability) < 1e-6
    batch = np.stack([np.full((96, 96, 3), v, np.uint8) for v in (0, 128, 255)])
    assert clf.predict_batch(batch).shape == (3,)
