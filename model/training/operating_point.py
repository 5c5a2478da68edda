"""Two operating thresholds chosen on validation, with a bootstrap margin per source.

``python -m model.training.operating_point --model DIR``

The node reports three levels (*fracture*, *doubt*, *no fracture*). Both thresholds are chosen
here on the validation split only, through the export the node loads (every file through
:class:`model.inference.Classifier`, its preprocessing and test-time augmentation):

* **lower** (``threshold``): sensitivity must hold at a new hospital, not only on these 431
  images. For each source separately (the bone fracture set and FracAtlas come from different
  hospitals and devices) the positives are resampled ``n_boot`` times; the lower threshold is
  the highest one at which the one-sided ``confidence`` lower bound of sensitivity is still at
  least ``target_sensitivity`` on *every* source. For one resample the highest threshold that
  keeps sensitivity >= target is its k-th highest positive score (k = ceil(target * n)), so the
  bound is exactly the ``1 - confidence`` quantile of those thresholds.
* **upper** (``upper_threshold``): a *fracture* must be likely. It is the lowest threshold above
  the lower one at which the one-sided ``confidence`` lower bound (Clopper-Pearson) of the
  positive predictive value over the whole validation split is at least ``target_ppv``. When
  no threshold reaches it, upper = the highest validation score, and the card says so.

The card gets both thresholds and an ``operating_point`` section: the rule, the bounds reached,
and per-source figures at each threshold; ``metrics.val`` is rewritten at the lower threshold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.artifact import read_card, write_card
from model.training.metrics import binary_metrics

TARGET_SENSITIVITY = 0.90
TARGET_PPV = 0.90
CONFIDENCE = 0.95
N_BOOT = 2000


def lower_threshold(
    y: np.ndarray,
    p: np.ndarray,
    sources: np.ndarray,
    target: float = TARGET_SENSITIVITY,
    confidence: float = CONFIDENCE,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> tuple[float, dict[str, float]]:
    """The lower threshold and, per source, the threshold its own bound would allow."""
    rng = np.random.default_rng(seed)
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    per_source: dict[str, float] = {}
    for src in sorted(set(np.asarray(sources).tolist())):
        pos = np.sort(p[(sources == src) & y])[::-1]
        if len(pos) == 0:
            continue
        k = math.ceil(target * len(pos))
        draws = np.sort(rng.choice(pos, size=(n_boot, len(pos)), replace=True), axis=1)[:, ::-1]
        per_source[src] = float(np.quantile(draws[:, k - 1], 1 - confidence, method="lower"))
    if not per_source:
        raise ValueError("the validation split holds no fractured image")
    return min(per_source.values()), per_source


def ppv_lower_bounds(
    y: np.ndarray, p: np.ndarray, thresholds: np.ndarray, confidence: float = CONFIDENCE
) -> np.ndarray:
    """One-sided Clopper-Pearson lower bound of the PPV at each threshold.

    Exact binomial rather than bootstrap: above a high threshold only a handful of images
    remain, and a bootstrap of five fractured images says PPV 1.0 for certain; the exact bound
    of 5 of 5 is 0.55.
    """
    from scipy.stats import beta

    y = np.asarray(y).astype(bool)
    above = np.asarray(p)[None, :] >= np.asarray(thresholds)[:, None]
    tp = (above & y[None, :]).sum(axis=1)
    fp = (above & ~y[None, :]).sum(axis=1)
    bound = beta.ppf(1 - confidence, tp, fp + 1)
    return np.where(tp > 0, np.nan_to_num(bound), 0.0)


def upper_threshold(
    y: np.ndarray,
    p: np.ndarray,
    lower: float,
    target: float = TARGET_PPV,
    confidence: float = CONFIDENCE,
) -> tuple[float, float, bool]:
    """(upper threshold, its PPV lower bound, whether the target was reached)."""
    cands = np.unique(np.asarray(p)[np.asarray(p) >= lower])
    if len(cands) == 0:
        return lower, 0.0, False
    bounds = ppv_lower_bounds(y, p, cands, confidence)
    ok = np.nonzero(bounds >= target)[0]
    if len(ok):
        return float(cands[ok[0]]), float(bounds[ok[0]]), True
    best = int(np.argmax(bounds))
    return float(cands[-1]), float(bounds[best]), False


def by_source(y: np.ndarray, p: np.ndarray, sources: np.ndarray, t: float) -> dict[str, Any]:
    out = {"all": binary_metrics(y, p, t)}
    for src in sorted(set(sources.tolist())):
        m = sources == src
        out[src] = binary_metrics(y[m], p[m], t)
    return out


def choose(model_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Choose both thresholds for ``model_dir`` and rewrite its card."""
    card = read_card(model_dir)
    from model.training.selection import predictions

    # every validation file through the export the node loads (no cache: a new card)
    v = predictions(model_dir, "val", argparse.Namespace(**{**vars(args), "predictions_dir": None}))
    y, p, s = v["y"], v["p"], v["sources"]
    lower, per_source = lower_threshold(y, p, s, args.target_sensitivity, args.confidence)
    upper, ppv_bound, reached = upper_threshold(y, p, lower, args.target_ppv, args.confidence)
    section = {
        "rule": "lower: highest threshold whose one-sided bootstrap lower bound of sensitivity "
        "is >= target on every source; upper: lowest threshold above it whose bootstrap lower "
        "bound (Clopper-Pearson) of PPV on validation is >= target "
        "(model.training.operating_point)",
        "split": "val",
        "n_boot": N_BOOT,
        "confidence": args.confidence,
        "target_sensitivity": args.target_sensitivity,
        "target_ppv": args.target_ppv,
        "lower_threshold_allowed_by_source": {k: round(v_, 6) for k, v_ in per_source.items()},
        "upper_ppv_lower_bound": round(ppv_bound, 4),
        "upper_target_reached": reached,
        "at_lower": by_source(y, p, s, lower),
        "at_upper": by_source(y, p, s, upper),
        "levels_on_val": {
            "fracture": int((p >= upper).sum()),
            "doubt": int(((p >= lower) & (p < upper)).sum()),
            "no fracture": int((p < lower).sum()),
        },
    }
    extra = dict(card.extra)
    extra["operating_point"] = section
    extra["metrics"] = {**extra.get("metrics", {}), "val": binary_metrics(y, p, lower)}
    new = dataclasses.replace(
        card, threshold=round(lower, 6), upper_threshold=round(upper, 6), extra=extra
    )
    write_card(model_dir, new)
    return {"threshold": round(lower, 6), "upper_threshold": round(upper, 6), **section}


def main(argv: Sequence[str] | None = None) -> int:
    from model.training.threshold import add_data_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    add_data_arguments(parser)
    parser.add_argument("--target-sensitivity", type=float, default=TARGET_SENSITIVITY)
    parser.add_argument("--target-ppv", type=float, default=TARGET_PPV)
    parser.add_argument("--confidence", type=float, default=CONFIDENCE)
    args = parser.parse_args(argv)
    out = choose(args.model, args)
    brief = {k: out[k] for k in ("threshold", "upper_threshold", "levels_on_val")}
    brief["sensitivity_at_lower"] = {k: v["sensitivity"] for k, v in out["at_lower"].items()}
    brief["specificity_at_lower"] = {k: v["specificity"] for k, v in out["at_lower"].items()}
    brief["ppv_at_upper"] = {k: v["precision"] for k, v in out["at_upper"].items()}
    print(json.dumps(brief, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
