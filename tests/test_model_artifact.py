"""The shipped model: found by default, complete card, small, and it classifies real files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fracture_triage.settings import Settings
from model.artifact import MODEL_FILE, read_card
from model.inference import Classifier
from tests.conftest import REPO, SHARED, require

#: Left out of the fast tier: loads and runs Keras networks (TensorFlow).
pytestmark = pytest.mark.slow


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


def test_d4_test_time_augmentation_gives_one_answer_for_every_orientation(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With ``test_time_augmentation = d4`` in the card, a radiograph scanned rotated or
    mirrored gets the same probability, the mean of the 8 single-pass answers."""
    import dataclasses
    import shutil

    import numpy as np

    from model.artifact import write_card
    from model.features import dihedral_view
    from model.preprocess import load_network_input

    d4_dir = tmp_path / "d4"
    shutil.copytree(tiny_model_dir, d4_dir)
    write_card(d4_dir, dataclasses.replace(read_card(d4_dir), test_time_augmentation="d4"))
    single, d4 = Classifier.load(tiny_model_dir), Classifier.load(d4_dir)
    assert read_card(d4_dir).test_time_augmentation == "d4"

    path = sorted(require(SHARED / "datasets/fracatlas-train/images").glob("*.jpg"))[0]
    image = load_network_input(path, 96)
    views = np.stack([dihedral_view(image, k) for k in range(8)])
    one_pass = single.predict_batch(views)
    # the single pass does depend on orientation, so the test can tell the two apart
    assert one_pass.max() - one_pass.min() > 1e-4
    averaged = d4.predict_batch(views)
    np.testing.assert_allclose(averaged, np.full(8, one_pass.mean()), atol=1e-5)
    assert abs(d4.classify_file(path).probability - one_pass.mean()) < 1e-5


def test_card_rejects_unknown_test_time_augmentation(tiny_model_dir: Path) -> None:
    import dataclasses

    import pytest

    with pytest.raises(ValueError, match="test_time_augmentation"):
        dataclasses.replace(read_card(tiny_model_dir), test_time_augmentation="tencrop")
