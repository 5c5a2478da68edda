"""The shipped model and its LiteRT export: found as package data, complete card, an export
that answers what the Keras network answers, and a clear refusal of an export that does not
belong to its card."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from model.artifact import EXPORT_FILE, read_card, resolve_model_dir, write_card
from model.inference import Classifier, ExportError
from tests.conftest import REPO, SHARED, require

FRACATLAS_IMAGES = SHARED / "datasets/fracatlas-train/images"


def test_shipped_model_is_the_default_and_classifies() -> None:
    model_dir = resolve_model_dir(None)
    assert model_dir.parent == REPO / "model" / "artifacts"
    assert (model_dir / EXPORT_FILE).stat().st_size < 20_000_000
    card = read_card(model_dir)
    assert card.uid.startswith("2.25.") and 0 < card.threshold < 1 and card.input_size >= 224
    training = card.extra["training"]
    split = REPO / "model" / "splits" / training["split_file"]
    from model.artifact import file_sha256

    assert file_sha256(split) == training["split_file_sha256"]
    metrics = card.extra["metrics"]
    assert metrics["leakage_free_test"]["sensitivity"] >= 0.9
    for plot in card.extra["plots"].values():
        assert (model_dir / plot).is_file()
    assert json.loads((model_dir / "history.json").read_text())
    # the export was checked against Keras on every validation file at ship time
    assert card.export is not None and card.export.test_time_augmentation == "d4"
    assert card.export.checked_files >= 400
    assert card.export.max_abs_difference is not None and card.export.max_abs_difference < 1e-4

    clf = Classifier.load(model_dir)
    images = sorted(require(FRACATLAS_IMAGES).glob("*.jpg"))[:4]
    probs = [clf.classify_file(p).probability for p in images]
    assert all(0.0 <= p <= 1.0 for p in probs)


@pytest.mark.slow  # runs the Keras network (TensorFlow)
def test_export_agrees_with_keras_on_real_validation_files() -> None:
    """The shipped export against the Keras network it was made from (same TTA, same input),
    on a handful of validation files; the card holds the figure over all of them."""
    from model.training.data import read_all
    from model.training.export import max_difference
    from model.training.train import select

    model_dir = resolve_model_dir(None)
    bfmr = require(SHARED / "datasets/bone-fracture-multi-region")
    records = read_all(bfmr, require(SHARED / "datasets/fracatlas-train"))
    val = set(select(records, "leakage-free", REPO / "model/splits/split_v1.csv")["val"])
    files = [r.path for r in records if r.key in val]
    picked = files[:: max(1, len(files) // 6)][:6]
    worst, n = max_difference(model_dir, picked)
    assert n == len(picked) and worst < 1e-4


def test_d4_export_gives_one_answer_for_every_orientation(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """With ``test_time_augmentation = d4`` exported, a radiograph scanned rotated or mirrored
    gets the same probability, the mean of the 8 single-pass answers."""
    from model.imaging import load_network_input
    from model.training.export import export
    from model.training.features import dihedral_view

    d4_dir = tmp_path / "d4"
    shutil.copytree(tiny_model_dir, d4_dir)
    write_card(d4_dir, dataclasses.replace(read_card(d4_dir), test_time_augmentation="d4"))
    export(d4_dir)
    single, d4 = Classifier.load(tiny_model_dir), Classifier.load(d4_dir)

    path = sorted(require(FRACATLAS_IMAGES).glob("*.jpg"))[0]
    image = load_network_input(path, 96)
    views = np.stack([dihedral_view(image, k) for k in range(8)])
    one_pass = single.predict_batch(views)
    # the single pass does depend on orientation, so the test can tell the two apart
    assert one_pass.max() - one_pass.min() > 1e-4
    averaged = d4.predict_batch(views)
    np.testing.assert_allclose(averaged, np.full(8, one_pass.mean()), atol=1e-5)
    assert abs(d4.classify_file(path).probability - one_pass.mean()) < 1e-5


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "does not match the sha256"),
        ("garbage", "does not match the sha256"),
        ("remove", "no export file"),
        ("card_size", "takes 96 px images but the card says 128"),
        ("card_tta", "test-time augmentation 'none' but the card says 'd4'"),
        ("no_record", "records no inference export"),
        ("relabelled", "LiteRT cannot load"),
    ],
)
def test_an_export_that_does_not_belong_to_its_card_is_refused(
    tiny_model_dir: Path, tmp_path: Path, damage: str, message: str
) -> None:
    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    export_file = model_dir / EXPORT_FILE
    card = read_card(model_dir)
    if damage == "truncate":
        export_file.write_bytes(export_file.read_bytes()[:1000])
    elif damage == "garbage":
        export_file.write_bytes(b"not a flatbuffer" * 100)
    elif damage == "remove":
        export_file.unlink()
    elif damage == "card_size":
        write_card(model_dir, dataclasses.replace(card, input_size=128))
    elif damage == "card_tta":
        write_card(model_dir, dataclasses.replace(card, test_time_augmentation="d4"))
    elif damage == "no_record":
        write_card(model_dir, dataclasses.replace(card, export=None))
    elif damage == "relabelled":
        # a file whose digest the card was told to trust, but which is no model at all
        export_file.write_bytes(b"\x00" * 4096)
        from model.artifact import file_sha256

        assert card.export is not None
        info = dataclasses.replace(card.export, sha256=file_sha256(export_file))
        write_card(model_dir, dataclasses.replace(card, export=info))
    with pytest.raises(ExportError, match=message) as caught:
        Classifier.load(model_dir)
    assert str(model_dir) in str(caught.value)


def test_card_rejects_unknown_test_time_augmentation(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="test_time_augmentation"):
        dataclasses.replace(read_card(tiny_model_dir), test_time_augmentation="tencrop")


def test_classifying_loads_no_tensorflow(tiny_model_dir: Path) -> None:
    """The node's classification path (card, export, preprocessing) imports no TensorFlow,
    Keras or training code."""
    image = sorted(require(FRACATLAS_IMAGES).glob("*.jpg"))[0]
    code = (
        "import sys; from pathlib import Path; from model.inference import Classifier; "
        f"p = Classifier.load(Path({str(tiny_model_dir)!r})).classify_file(Path({str(image)!r}));"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('tensorflow', 'keras', 'sklearn', 'matplotlib') or m.startswith('model.training'));"
        "print(p.probability, heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO
    ).stdout
    probability, heavy = out.split(" ", 1)
    assert 0.0 <= float(probability) <= 1.0
    assert heavy.strip() == "[]"
