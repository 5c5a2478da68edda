"""Comparing two evaluation reports: the paired bootstrap interval of the AUROC difference."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from model.experiments.compare import main, paired_auroc_difference

# Thousands of bootstrap resamples through scikit-learn: seconds, not the fast tier.
pytestmark = pytest.mark.slow


def scores(noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.array([0, 1] * 100)
    return y, y + rng.normal(0, noise, len(y))


def test_a_clearly_better_model_has_an_interval_above_zero() -> None:
    y, weak = scores(1.5)
    _, strong = scores(0.3, seed=1)
    result = paired_auroc_difference(y, weak, strong, resamples=500)
    assert result["auroc_b"] > result["auroc_a"]
    assert 0 < result["ci95"][0] <= result["difference"] <= result["ci95"][1]


def test_the_same_model_twice_differs_by_nothing() -> None:
    y, p = scores(1.0)
    result = paired_auroc_difference(y, p, p, resamples=200)
    assert result["difference"] == 0 and result["ci95"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="both classes"):
        paired_auroc_difference(np.ones(4), p[:4], p[:4])


def report(path: Path, files: list[str], y: np.ndarray, p: np.ndarray) -> Path:
    rows = [
        {"file": f, "label": int(a), "probability": float(b)}
        for f, a, b in zip(files, y, p, strict=True)
    ]
    path.write_text(json.dumps({"predictions": rows}))
    return path


def test_reports_on_different_files_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    y, p = scores(1.0)
    files = [f"{i}.jpg" for i in range(len(y))]
    a = report(tmp_path / "a.json", files, y, p)
    assert main([str(a), str(a), "--resamples", "50"]) == 0
    assert json.loads(capsys.readouterr().out)["difference"] == 0
    b = report(tmp_path / "b.json", [f"other/{f}" for f in files], y, p)
    assert main([str(a), str(b)]) == 2
    assert "not on the same files" in capsys.readouterr().err


def test_the_difference_is_broken_down_by_shared_data_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # b is better than a on the FracAtlas files only; the breakdown must say so
    y, weak = scores(1.5)
    _, strong = scores(0.3, seed=1)
    half = len(y) // 2
    files = [f"d/fracatlas-train/images/IMG{i:07d}.jpg" for i in range(half)] + [
        f"d/bone-fracture-multi-region/images/{i}.jpg" for i in range(half, len(y))
    ]
    better_on_fracatlas = np.concatenate([strong[:half], weak[half:]])
    a = report(tmp_path / "a.json", files, y, weak)
    b = report(tmp_path / "b.json", files, y, better_on_fracatlas)
    assert main([str(a), str(b), "--resamples", "300"]) == 0
    result = json.loads(capsys.readouterr().out)
    fracatlas, bfmr = result["by_source"]["fracatlas"], result["by_source"]["bfmr"]
    assert fracatlas["n"] == bfmr["n"] == half
    assert fracatlas["ci95"][0] > 0
    assert bfmr["difference"] == 0 and bfmr["ci95"] == [0.0, 0.0]
    assert 0 < result["difference"] < fracatlas["difference"]
