"""Plots people can look at: ROC curve, confusion matrix, training curves (PNG)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt

    return plt


def roc_plot(y: np.ndarray, p: np.ndarray, threshold: float, path: Path, title: str) -> Path:
    from sklearn.metrics import roc_auc_score, roc_curve

    plt = _pyplot()
    fpr, tpr, _ = roc_curve(y, p)
    auc = roc_auc_score(y, p)
    pred = p >= threshold
    y = np.asarray(y).astype(bool)
    op_tpr = (pred & y).sum() / max(y.sum(), 1)
    op_fpr = (pred & ~y).sum() / max((~y).sum(), 1)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    ax.plot(fpr, tpr, lw=2, label=f"ROC (AUROC {auc:.3f})")
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1)
    ax.plot([op_fpr], [op_tpr], "o", color="red", label=f"threshold {threshold:.3f}")
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def confusion_plot(matrix: Sequence[Sequence[int]], path: Path, title: str) -> Path:
    plt = _pyplot()
    m = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(4.5, 4), dpi=100)
    ax.imshow(m, cmap="Blues")
    labels = ["not fractured", "fractured"]
    ax.set_xticks([0, 1], labels)
    ax.set_yticks([0, 1], labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(2):
        for j in range(2):
            colour = "white" if m[i, j] > m.max() / 2 else "black"
            ax.text(j, i, str(m[i, j]), ha="center", va="center", color=colour, fontsize=14)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def history_plot(history: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """Loss and accuracy (or, for end-to-end runs, validation AUROC per source) per epoch,
    train and validation, both phases on one time axis."""
    plt = _pyplot()
    x = np.arange(1, len(history) + 1)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), dpi=100)
    second = "accuracy" if history and "accuracy" in history[0] else "val_auroc"
    for ax, key in zip(axes, ("loss", second), strict=True):
        if key == "val_auroc":
            for source in history[0]["val_auroc"]:
                values = [h["val_auroc"].get(source) for h in history]
                ax.plot(x, values, "-o", ms=3, label=f"validation AUROC ({source})")
        else:
            ax.plot(x, [h[key] for h in history], "-o", ms=3, label=f"train {key}")
            ax.plot(x, [h[f"val_{key}"] for h in history], "-o", ms=3, label=f"validation {key}")
        phases = [h.get("phase") for h in history]
        for i in range(1, len(phases)):
            if phases[i] != phases[i - 1]:
                ax.axvline(i + 0.5, color="grey", ls="--", lw=1)
                ax.text(i + 0.6, ax.get_ylim()[1], f" {phases[i]}", va="top", fontsize=8)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
