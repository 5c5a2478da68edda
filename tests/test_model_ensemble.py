"""Seed ensemble: two small real members trained from one cache answer, as one artifact, the
mean of their answers, with a threshold chosen on validation files."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from model.artifact import MODEL_FILE, read_card, write_card
from model.inference import Classifier
from model.training.export import export
from tests.conftest import REPO, SHARED, require

#: Left out of the fast tier: trains two small networks (TensorFlow).
pytestmark = pytest.mark.slow

WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_1.0_224_no_top.h5"
BFMR = SHARED / "datasets/bone-fracture-multi-region"
FRACATLAS = SHARED / "datasets/fracatlas-train"
CUT = "block_15_add"  # a shallow top keeps the two trainings short


def small_split(path: Path, per_label: int = 6) -> Path:
    """The first ``per_label`` rows of each label in each split of the committed split file."""
    with open(require(REPO / "model/splits/split_v1.csv"), newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept = []
    for name in ("train", "val", "test"):
        for label in ("fractured", "not fractured"):
            kept += [r for r in rows if r["split"] == name and r["label"] == label][:per_label]
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return path


def train_member(tmp: Path, split: Path, seed: int) -> Path:
    from model.training import train

    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    out = tmp / f"seed{seed}"
    args = parser.parse_args(
        [
            "--bfmr-dir", str(require(BFMR)),
            "--fracatlas-dir", str(require(FRACATLAS)),
            "--weights", str(require(WEIGHTS)),
            "--split", str(split),
            "--cache", str(tmp / "cache"),  # built by the first member, reused by the second
            "--out", str(out),
            "--size", "96",
            "--views", "2",
            "--cut-layer", CUT,
            "--head-epochs", "2",
            "--epochs", "1",
            "--batch-size", "8",
            "--seed", str(seed),
            "--version", f"seed{seed}",
        ]
    )  # fmt: skip
    train.train(args)
    return out


@pytest.mark.timeout(300)
def test_ensemble_answers_the_mean_of_its_members(tmp_path: Path) -> None:
    from model.experiments import ensemble

    split = small_split(tmp_path / "split.csv")
    members = [train_member(tmp_path, split, seed) for seed in (1, 2)]
    out = tmp_path / "ensemble"
    code = ensemble.main(
        [
            *("--member", str(members[0]), "--member", str(members[1])),
            *("--out", str(out), "--version", "ens", "--tta", "d4"),
            *("--bfmr-dir", str(BFMR), "--fracatlas-dir", str(FRACATLAS)),
            *("--split", str(split)),
        ]
    )
    assert code == 0

    card = read_card(out)
    assert card.version == "ens" and card.test_time_augmentation == "d4"
    assert card.uid not in {read_card(m).uid for m in members}
    assert [m["seed"] for m in card.extra["ensemble"]["members"]] == [1, 2]
    # the threshold was chosen on the 12 validation files for the members' target sensitivity
    val = card.extra["metrics"]["val"]
    assert val["n"] == 12 and val["positives"] == 6 and val["threshold"] == card.threshold
    assert val["sensitivity"] >= card.extra["training"]["target_sensitivity"]

    images = sorted((FRACATLAS / "images").glob("*.jpg"))[:3]
    combined = Classifier.load(out)
    # several heads: no exact class activation map, so the export has none and says so
    assert not combined.has_map
    assert combined.card.export is not None and not combined.card.export.class_activation_map
    singles = []
    for i, member in enumerate(members):
        # the members' own cards carry no TTA: compare like with like
        d4 = tmp_path / f"member_d4_{i}"
        shutil.copytree(member, d4)
        write_card(d4, dataclasses.replace(read_card(d4), test_time_augmentation="d4"))
        export(d4)
        clf = Classifier.load(d4)
        singles.append([clf.classify_file(p).probability for p in images])
    got = [combined.classify_file(p).probability for p in images]
    assert not np.allclose(singles[0], singles[1], atol=1e-4), "the seeds trained alike"
    np.testing.assert_allclose(got, np.mean(singles, axis=0), atol=1e-5)


def twin(model: Any) -> Any:
    """Another network object with ``model``'s weights."""
    import keras

    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy


def test_members_from_different_frozen_bases_are_refused() -> None:
    from model.experiments.ensemble import build_ensemble
    from model.training.network import build_classifier

    first, _ = build_classifier(64, weights=None)
    second, _ = build_classifier(64, weights=None)  # another random base: not one cache
    with pytest.raises(ValueError, match="same frozen base"):
        build_ensemble([first, second], CUT)
    with pytest.raises(ValueError, match="at least two members"):
        build_ensemble([first], CUT)
    with pytest.raises(ValueError, match="its own network object"):
        build_ensemble([first, first], CUT)


def test_ensemble_file_is_one_network_answering_the_mean(tmp_path: Path) -> None:
    """The artifact is an ordinary ``best_model.keras``: one input, one probability, which
    is the mean of the members' probabilities after saving and loading."""
    import keras

    from model.experiments.ensemble import build_ensemble
    from model.training.network import build_classifier

    first, _ = build_classifier(64, weights=None)
    second = twin(first)
    dense = second.get_layer("fracture_probability")
    kernel, bias = dense.get_weights()
    dense.set_weights([kernel * -2.0, bias + 0.5])  # a different top above the shared base
    network = build_ensemble([first, second], CUT)
    network.save(tmp_path / MODEL_FILE)
    again = keras.models.load_model(tmp_path / MODEL_FILE, compile=False)

    x = np.random.default_rng(0).uniform(0, 255, (3, 64, 64, 3)).astype(np.float32)
    p1, p2 = np.asarray(first(x)).ravel(), np.asarray(second(x)).ravel()
    assert np.abs(p1 - p2).max() > 1e-3
    np.testing.assert_allclose(np.asarray(again(x)).ravel(), (p1 + p2) / 2, atol=1e-5)
