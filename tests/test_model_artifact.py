"""The shipped model: found by default, complete card, small, and it classifies real files."""

from __future__ import annotations

import json

from fracture_triage.settings import Settings
from model.artifact import MODEL_FILE, read_card
from model.inference import Classifier
from tests.conftest import REPO, SHARED, require


def test_shipped_model_is_the_default_and_classifies() -> None:
    model_dir = Settings().model_dir
    assert model_dir is not None and model_dir.parent == REPO / "model" / "artifacts"
    assert (model_dir / MODEL_FILE).stat().st_size < 20_000_000
    card = read_card(model_dir)
    assert card.uid.startswith("2.25.") and 0 < card.threshold < 1 and card.input_size >= 224
    training = card.extra["training"]
    split = REPO / "model" / "splits" / training["split_file"]
    from model.data import file_sha256

    assert file_sha256(split) == training["split_file_sha256"]
    metrics = card.extra["metrics"]
    assert metrics["leakage_free_test"]["sensitivity"] >= 0.9
    for plot in card.extra["plots"].values():
        assert (model_dir / plot).is_file()
    assert json.loads((model_dir / "history.json").read_text())

    clf = Classifier.load(model_dir)
    images = sorted(require(SHARED / "datasets/fracatlas-train/images").glob("*.jpg"))[:4]
    probs = [clf.classify_file(p).probability for p in images]
    assert all(0.0 <= p <= 1.0 for p in probs)
