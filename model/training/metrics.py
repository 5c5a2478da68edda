"""Binary classification metrics at an operating threshold, and choosing that threshold."""

from __future__ import annotations

from typing import Any

import numpy as np


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The triage operating point on validation data: sensitivity at least ``target``, and
    among those thresholds the highest specificity; among equally specific thresholds the most
    sensitive one, placed midway to the next lower score for a margin.

    (Taking simply the highest threshold that reaches ``target`` would give away positives
    even where validation shows a threshold that loses none at the same specificity.)
    """
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    if not y.any():
        return 0.5
    cands = np.unique(p)[::-1]  # descending
    best: tuple[float, float] | None = None  # (specificity, -threshold)
    chosen = float(cands[-1])
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    for t in cands:
        pred = p >= t
        sens = (pred & y).sum() / n_pos
        if sens + 1e-12 < target:
            continue
        spec = (~pred & ~y).sum() / n_neg if n_neg else 1.0
        key = (float(spec), -float(t))
        if best is None or key > best:
            best, chosen = key, float(t)
    lower = p[p < chosen]
    return float((chosen + lower.max()) / 2) if len(lower) else chosen


def binary_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, Any]:
    """n, accuracy, AUROC, sensitivity, specificity, precision, F1 and the confusion matrix
    (rows = truth [not fractured, fractured], columns = prediction) at ``threshold``."""
    y = np.asarray(y).astype(bool)
    p = np.asarray(p, dtype=np.float64)
    pred = p >= threshold
    tp = int((pred & y).sum())
    tn = int((~pred & ~y).sum())
    fp = int((pred & ~y).sum())
    fn = int((~pred & y).sum())

    def ratio(a: int, b: int) -> float | None:
        return round(a / b, 4) if b else None

    sens = ratio(tp, tp + fn)
    prec = ratio(tp, tp + fp)
    f1 = ratio(2 * tp, 2 * tp + fp + fn)
    auroc = None
    if y.any() and (~y).any():
        from sklearn.metrics import roc_auc_score

        auroc = round(float(roc_auc_score(y, p)), 4)
    return {
        "n": int(len(y)),
        "positives": int(y.sum()),
        "threshold": round(float(threshold), 6),
        "accuracy": ratio(tp + tn, len(y)),
        "auroc": auroc,
        "sensitivity": sens,
        "specificity": ratio(tn, tn + fp),
        "precision": prec,
        "f1": f1,
        "confusion_matrix": {
            "labels": ["not fractured", "fractured"],
            "matrix": [[tn, fp], [fn, tp]],
        },
    }
