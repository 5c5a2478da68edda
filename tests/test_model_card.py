"""The model card: finishing an artifact again (a new selection note, a new throughput) keeps
the validation figures its threshold was chosen on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from model.artifact import ModelCard, read_card, write_card
from model.training.card import finish
from model.training.metrics import binary_metrics


def evaluation(out: Path, marker: str, seed: int) -> Path:
    """An evaluation report as ``fracture-triage evaluate`` writes it, for 40 files."""
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * 20)
    p = np.clip(y * 0.4 + rng.uniform(0, 0.6, len(y)), 0, 1)
    report = binary_metrics(y, p, 0.5) | {
        "errors": [],
        "predictions": [
            {"file": f"/data/{marker}/{i}.jpg", "label": int(a), "probability": float(b)}
            for i, (a, b) in enumerate(zip(y, p, strict=True))
        ],
    }
    out.mkdir()
    (out / "evaluation.json").write_text(json.dumps(report))
    return out


def artifact(path: Path, val: dict[str, object]) -> Path:
    path.mkdir()
    training = {
        "target_sensitivity": 0.92,
        "dataset_manifests_sha256": {"fracatlas-train": "0" * 64},
        "images": {"train": 30, "val": 40, "test": 40},
        "fractured": {"train": 15, "val": 20, "test": 20},
        "views_per_image": 4,
        "class_weights": {"0": 1.0, "1": 1.0},
        "seed": 1,
        "epochs_run": 1,
        "seconds_feature_cache": 1.0,
        "seconds_training": 1.0,
    }
    card = ModelCard(
        name="card-test",
        version="1",
        uid="2.25.1",
        threshold=0.5,
        input_size=224,
        extra={"architecture": "test", "training": training, "metrics": {"val": val}},
    )
    write_card(path, card)
    row = {"phase": "fine-tune", "loss": 0.6, "accuracy": 0.7, "val_loss": 0.5, "val_accuracy": 0.8}
    (path / "history.json").write_text(json.dumps([row, row]))
    return path


def test_finishing_twice_keeps_the_validation_figures(tmp_path: Path) -> None:
    val = binary_metrics(np.array([0, 1, 1, 0]), np.array([0.1, 0.9, 0.6, 0.4]), 0.5)
    model_dir = artifact(tmp_path / "artifact", val)
    original = artifact(tmp_path / "original", val)
    honest = evaluation(tmp_path / "honest", "fracatlas-train", 1)
    leaky = evaluation(tmp_path / "leaky", "bone-fracture", 2)
    audit = tmp_path / "audit.json"
    audit.write_text(
        json.dumps(
            {
                "split_file": "split.csv",
                "split_file_sha256": "1" * 64,
                "method": "pHash",
                "threshold_bits": 8,
                "min_similarity": 0.9,
                "groups": 3,
                "groups_per_split": {},
                "images_per_split_and_label": {},
                "excluded": [],
                "original_split": {
                    "test_images_with_near_duplicate_in_original_train": 1,
                    "distinct_test_images": 2,
                },
                "audit": {
                    "test_images_with_near_duplicate_in_train": 0,
                    "groups_on_two_sides": 0,
                    "test_fracatlas_ids_also_in_train": 0,
                },
            }
        )
    )
    for _ in range(2):
        card = finish(model_dir, honest, leaky, original, audit, None, None)
        assert card.extra["metrics"]["validation"] == val
    assert read_card(model_dir).extra["metrics"]["validation"] == val
    text = (model_dir / "model_card.md").read_text()
    prefix = "Validation (threshold chosen here): "
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1 and json.loads(lines[0][len(prefix) :]) == val
