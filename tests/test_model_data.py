"""Reading and cleaning the real shared data sets: damaged files are reported, never fatal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from model.training.data import (
    Rejected,
    check_image,
    integrity_problem,
    load_gray,
    read_bfmr,
    read_fracatlas,
    read_labelled_csv,
)
from model.training.metrics import binary_metrics, threshold_for_sensitivity
from tests.conftest import SHARED, require

BFMR = SHARED / "datasets" / "bone-fracture-multi-region"
FRACATLAS = SHARED / "datasets" / "fracatlas-train"
# Named by the data set's README as truncated (IMG0004307.jpg: Pillow decodes it anyway,
# filling the missing rows with grey; IMG0004134.jpg: Pillow refuses it).
SILENTLY_TRUNCATED = "098ef69d33c95"
LOUDLY_TRUNCATED = "467f9fa1b2958"


def test_manifests_fold_duplicates_and_link_fracatlas_ids() -> None:
    bfmr = read_bfmr(require(BFMR))
    assert len(bfmr) == 3887  # distinct files, not the 10,574 manifest rows
    assert len({r.sha256 for r in bfmr}) == len(bfmr)
    assert sum(len(r.original_splits) for r in bfmr) == 10574
    assert any(r.fracatlas_id for r in bfmr)
    atlas = read_fracatlas(require(FRACATLAS))
    assert len(atlas) == 1516
    assert sum(r.label for r in atlas) == 281


def test_truncated_jpegs_are_detected(tmp_path: Path) -> None:
    silent = next(require(BFMR / "images").glob(SILENTLY_TRUNCATED + "*"))
    loud = next(require(BFMR / "images").glob(LOUDLY_TRUNCATED + "*"))
    assert "truncated" in (integrity_problem(silent) or "")
    assert "truncated" in (check_image(loud) or "")
    good = next(r for r in read_fracatlas(FRACATLAS))
    assert check_image(good.path) is None
    # a real image cut in half, and a file of noise
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.path.read_bytes()[: good.path.stat().st_size // 2])
    noise = tmp_path / "noise.png"
    noise.write_bytes(np.random.default_rng(0).bytes(5000))
    assert check_image(cut) is not None
    assert check_image(noise) is not None


def test_load_gray_reports_corrupt_files_and_keeps_going(tmp_path: Path) -> None:
    records = read_fracatlas(require(FRACATLAS))[:3]
    broken = tmp_path / "broken.jpg"
    shutil.copy(records[1].path, broken)
    broken.write_bytes(broken.read_bytes()[:2000])
    from dataclasses import replace

    records[1] = replace(records[1], path=broken)
    results = list(load_gray(records))
    assert [type(r).__name__ for _, r in results] == ["ndarray", "Rejected", "ndarray"]
    rejected = results[1][1]
    assert isinstance(rejected, Rejected) and "broken.jpg" in rejected.reason


def test_labelled_csv_paths_are_relative_to_the_csv(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    csv_path = tmp_path / "sub" / "m.csv"
    csv_path.write_text("file,label\na.png,fractured\n../b.png,Not Fractured\n")
    assert read_labelled_csv(csv_path) == [
        (tmp_path / "sub" / "a.png", 1),
        (tmp_path / "sub" / "../b.png", 0),
    ]


def test_threshold_meets_sensitivity_with_best_specificity() -> None:
    y = np.array([1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
    p = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.1, 0.2, 0.32, 0.05, 0.01])
    t = threshold_for_sensitivity(y, p, 0.9)
    # 9 of 10 positives at or above 0.3 (0.32 is the only negative above); midway to 0.2
    assert t == 0.25
    m = binary_metrics(y, p, t)
    assert m["sensitivity"] == 0.9 and m["specificity"] == 0.75
    assert m["confusion_matrix"]["matrix"] == [[3, 1], [1, 9]]
    # positive-negative pairs ranked right: 9 + 8 + 10 + 10 of 40
    assert m["auroc"] == 0.925
    # separable scores: no positive is given away to reach "at least 0.9"
    y2 = np.array([1] * 10 + [0] * 10)
    p2 = np.r_[np.linspace(0.6, 0.99, 10), np.linspace(0.01, 0.4, 10)]
    t2 = threshold_for_sensitivity(y2, p2, 0.9)
    assert 0.4 < t2 < 0.6 and binary_metrics(y2, p2, t2)["sensitivity"] == 1.0
