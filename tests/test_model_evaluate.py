"""Evaluation on a tiny manifest with known answers, and ``classify`` on files and folders."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.artifact import MODEL_FILE, ModelCard, read_card, write_card
from model.inference import Classifier
from model.training.evaluate import REPORT_FILE, evaluate
from model.training.export import export
from tests.conftest import REPO, SHARED, require

#: Left out of the fast tier: builds and runs Keras networks, one through the command line.
pytestmark = pytest.mark.slow

IMAGES = SHARED / "datasets" / "fracatlas-train" / "images"


@pytest.fixture(scope="module")
def brightness_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real saved Keras artifact whose score is a known function of the image: the sigmoid
    of the mean brightness, so distinct images get distinct, predictable probabilities."""
    import keras

    inputs = keras.Input(shape=(64, 64, 3), name="image")
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    dense = keras.layers.Dense(1, activation="sigmoid")
    out = dense(x)
    dense.set_weights([np.array([[12.0], [0.0], [0.0]]), np.array([-4.0])])
    model = keras.Model(inputs, out)
    out_dir = tmp_path_factory.mktemp("brightness")
    model.save(out_dir / MODEL_FILE)
    write_card(out_dir, ModelCard("brightness", "test", "2.25.42", 0.5, 64))
    export(out_dir)
    return out_dir


def _model_with_median_threshold(
    model_dir: Path, tmp_path: Path, files: list[Path]
) -> tuple[Path, np.ndarray]:
    """The model with its threshold set between its own scores, so that both predicted classes
    occur and every expected figure is known in advance."""
    probs = np.array([Classifier.load(model_dir).classify_file(f).probability for f in files])
    order = np.sort(probs)
    assert len(set(order.tolist())) == len(order)
    threshold = float((order[len(order) // 2 - 1] + order[len(order) // 2]) / 2)
    out = tmp_path / "model"
    shutil.copytree(model_dir, out)
    card = read_card(out)
    write_card(out, ModelCard(**{**card.__dict__, "threshold": threshold}))
    return out, probs


def test_evaluate_known_answers_and_corrupt_file(
    brightness_model_dir: Path, tmp_path: Path
) -> None:
    files = sorted(require(IMAGES).glob("*.jpg"))[:8]
    model_dir, probs = _model_with_median_threshold(brightness_model_dir, tmp_path, files)
    threshold = read_card(model_dir).threshold
    predicted = probs >= threshold
    assert predicted.sum() == 4
    # truth = prediction, except one false positive and one false negative
    truth = predicted.copy()
    truth[np.flatnonzero(predicted)[0]] = False
    truth[np.flatnonzero(~predicted)[0]] = True
    data = tmp_path / "data"
    data.mkdir()
    rows = ["file,label"]
    for f, t in zip(files, truth, strict=True):
        shutil.copy(f, data / f.name)
        rows.append(f"data/{f.name},{'fractured' if t else 'not fractured'}")
    (data / "corrupt.jpg").write_bytes(files[0].read_bytes()[:1500])
    rows.append("data/corrupt.jpg,fractured")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("\n".join(rows) + "\n")

    report = evaluate(model_dir, manifest, tmp_path / "report")
    assert report["n"] == 8
    assert report["confusion_matrix"]["matrix"] == [[3, 1], [1, 3]]
    assert report["accuracy"] == 0.75
    assert report["sensitivity"] == 0.75 and report["specificity"] == 0.75
    assert report["precision"] == 0.75 and report["f1"] == 0.75
    from sklearn.metrics import roc_auc_score

    assert report["auroc"] == round(float(roc_auc_score(truth, probs)), 4)
    assert [e["file"] for e in report["errors"]] == [str(data / "corrupt.jpg")]
    saved = json.loads((tmp_path / "report" / REPORT_FILE).read_text())
    assert saved["confusion_matrix"] == report["confusion_matrix"]
    for plot in ("roc.png", "confusion_matrix.png"):
        assert (tmp_path / "report" / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classify_json_files_and_folders(brightness_model_dir: Path, tmp_path: Path) -> None:
    files = sorted(require(IMAGES).glob("*.jpg"))[:3]
    folder = tmp_path / "in"
    folder.mkdir()
    for f in files[1:]:
        shutil.copy(f, folder / f.name)
    (folder / "zz_broken.jpg").write_bytes(b"not an image at all")
    proc = subprocess.run(
        [sys.executable, "-m", "fracture_triage.cli", "classify", "--json",
         "--model", str(brightness_model_dir),
         str(files[0]), str(folder), str(tmp_path / "missing.dcm")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    ok = [x for x in lines if "probability" in x]
    bad = [x for x in lines if "error" in x]
    assert [Path(x["file"]).name for x in ok] == [f.name for f in files]
    expected = Classifier.load(brightness_model_dir).classify_file(files[0])
    assert abs(ok[0]["probability"] - expected.probability) < 1e-4
    assert all(x["fracture"] == (x["probability"] >= 0.5) for x in ok)
    assert sorted(Path(x["file"]).name for x in bad) == ["missing.dcm", "zz_broken.jpg"]


def test_classify_json_carries_the_decision_of_two_thresholds(
    brightness_model_dir: Path, tmp_path: Path
) -> None:
    """Thresholds set between the scores of three pictures: each gets another level, and
    ``fracture`` stays the flag at the lower threshold."""
    files = sorted(require(IMAGES).glob("*.jpg"))[:3]
    classifier = Classifier.load(brightness_model_dir)
    low, mid, high = sorted(classifier.classify_file(f).probability for f in files)
    assert low < mid < high
    model = tmp_path / "model"
    shutil.copytree(brightness_model_dir, model)
    card = read_card(model)
    lower, upper = (low + mid) / 2, (mid + high) / 2
    write_card(model, ModelCard(**{**card.__dict__, "threshold": lower, "upper_threshold": upper}))
    proc = subprocess.run(
        [sys.executable, "-m", "fracture_triage.cli", "classify", "--json", "--model", str(model),
         *map(str, files)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    by_level = {r["decision"]: r for r in rows}
    assert sorted(by_level) == ["doubt", "fracture", "no fracture"]
    assert by_level["fracture"]["probability"] == pytest.approx(high, abs=1e-6)
    assert by_level["doubt"]["probability"] == pytest.approx(mid, abs=1e-6)
    assert [by_level[d]["fracture"] for d in ("fracture", "doubt", "no fracture")] == [
        True,
        True,
        False,
    ]
    text = subprocess.run(
        [sys.executable, "-m", "fracture_triage.cli", "classify", "--model", str(model),
         str(files[0])],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert f"thresholds {lower:.4f} / {upper:.4f}" in text.stdout
