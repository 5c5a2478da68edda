"""Binary classification metrics at an operating threshold, and choosing that threshold."""

from __future__ import annotations

from typing import Any

import numpy as np


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float:
    """The highest threshold whose sensitivity (``p >= threshold`` on positives) is at least
    ``target``: the most specific operating point that still meets the triage target."""
    y = np.asarray(y).astype(bool)
    pos = np.sort(np.asarray(p, dtype=np.float64)[y])[::-1]
    if len(pos) == 0:
        return 0.5
    # need ceil(target * n_pos) positives at or above the threshold
    k = int(np.ceil(target * len(pos) - 1e-9))
    k = min(max(k, 1), len(pos))
    return float(pos[k - 1])


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
