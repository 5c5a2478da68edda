"""The two operating thresholds and the model-selection rule, on scores whose truth is known."""

from __future__ import annotations

import numpy as np
import pytest

from model.training.operating_point import lower_threshold, upper_threshold
from model.training.selection import paired_gain


def _scores(rng: np.random.Generator, n_pos: int, n_neg: int, sep: float) -> np.ndarray:
    return np.concatenate([rng.normal(sep, 1, n_pos), rng.normal(0, 1, n_neg)])


def test_lower_threshold_keeps_a_margin_on_every_source() -> None:
    rng = np.random.default_rng(3)
    # source a: many positives, well separated; source b: few positives, worse separated
    pa, pb = _scores(rng, 120, 100, 2.5), _scores(rng, 30, 200, 1.5)
    p = 1 / (1 + np.exp(-np.concatenate([pa, pb])))
    y = np.array([1] * 120 + [0] * 100 + [1] * 30 + [0] * 200)
    src = np.array(["a"] * 220 + ["b"] * 230)
    lower, per_source = lower_threshold(y, p, src, target=0.9)
    assert lower == min(per_source.values())
    for s in ("a", "b"):
        m = (src == s) & (y == 1)
        sens = float((p[m] >= lower).mean())
        # a bound, not a point: strictly above the target on each source
        assert sens > 0.9, (s, sens)
    # the source with fewer positives needs the larger margin, so it sets the threshold
    assert per_source["b"] < per_source["a"]
    # a point estimate on b alone would have allowed a higher threshold
    pos_b = np.sort(p[(src == "b") & (y == 1)])[::-1]
    assert lower < pos_b[int(np.ceil(0.9 * len(pos_b))) - 1]


def test_upper_threshold_reaches_the_ppv_bound_above_the_lower_one() -> None:
    rng = np.random.default_rng(4)
    p = 1 / (1 + np.exp(-_scores(rng, 150, 280, 2.5)))
    y = np.array([1] * 150 + [0] * 280)
    src = np.array(["a"] * 430)
    lower, _ = lower_threshold(y, p, src, target=0.9)
    upper, bound, reached = upper_threshold(y, p, lower, target=0.9)
    assert reached and upper > lower and bound >= 0.9
    assert float(y[p >= upper].mean()) >= 0.9  # the point PPV at least the bound
    # a handful of fractured images above a threshold is no evidence of a high PPV
    few = np.array([0.99] * 5 + [0.1] * 100)
    _, few_bound, few_reached = upper_threshold(np.array([1] * 5 + [0] * 100), few, 0.05)
    assert not few_reached and few_bound < 0.6


def test_upper_threshold_says_when_the_ppv_cannot_be_reached() -> None:
    rng = np.random.default_rng(5)
    p = rng.uniform(size=300)  # no information: PPV stays at prevalence
    y = rng.integers(0, 2, size=300)
    src = np.array(["a"] * 300)
    lower, _ = lower_threshold(y, p, src, target=0.9)
    upper, _bound, reached = upper_threshold(y, p, lower, target=0.95)
    assert not reached and upper == p.max()


@pytest.mark.slow  # 2 x 2,000 bootstrap resamples of a macro AUROC: ~35 s
def test_selection_rule_does_not_choose_noise_but_chooses_a_real_gain() -> None:
    rng = np.random.default_rng(6)
    y = np.array([1] * 150 + [0] * 280)
    src = np.array((["a"] * 75 + ["b"] * 75) + (["a"] * 140 + ["b"] * 140))
    truth = _scores(rng, 150, 280, 1.5)
    incumbent = truth + rng.normal(0, 0.3, 430)
    same = truth + rng.normal(0, 0.3, 430)  # another seed of the same model
    better = _scores(np.random.default_rng(7), 150, 280, 3.0)
    noise = paired_gain(y, src, incumbent, same)
    assert not noise["passes"] and noise["ci95"][0] < 0 < noise["ci95"][1]
    gain = paired_gain(y, src, incumbent, better)
    assert gain["passes"] and gain["gain"] > 0.05
