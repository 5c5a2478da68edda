"""Model selection that is not noise: the rule, written before the runs, and its command.

``python -m model.training.selection --incumbent DIR --candidate DIR [--candidate DIR ...]``

With ~230 validation images per source, one run's validation AUROC moves by several
hundredths between seeds, so a candidate is not chosen because its figure is higher. The rule:

1. Every candidate is judged on the validation split only, through its export (the node's
   preprocessing and test-time augmentation), by the **macro AUROC**: the mean of the AUROCs on
   the two sources, so that FracAtlas (the second hospital, 1 image in 7 fractured) counts as
   much as the bone fracture set.
2. A candidate **replaces the incumbent only when the paired bootstrap** (2,000 resamples of
   the validation images, stratified by source and label; the same resample for both models)
   **puts the 95 % interval of its macro-AUROC gain above zero.** Otherwise the incumbent stays.
3. Among candidates that pass, a larger input size or a costlier recipe must pass against the
   cheaper passing candidate too; otherwise the cheaper one is preferred.
4. The test split is evaluated **once per candidate**, after the choice, and reported for every
   candidate, chosen or rejected; it never changes the choice.

The command prints, per candidate, validation macro AUROC, the gain with its interval, the
verdict of rule 2, and the test figures.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

N_BOOT = 2000


def macro_auroc(y: np.ndarray, p: np.ndarray, sources: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    values = []
    for src in sorted(set(sources.tolist())):
        m = sources == src
        if y[m].any() and (~y[m].astype(bool)).any():
            values.append(roc_auc_score(y[m], p[m]))
    return float(np.mean(values))


def paired_gain(
    y: np.ndarray,
    sources: np.ndarray,
    p_incumbent: np.ndarray,
    p_candidate: np.ndarray,
    n_boot: int = N_BOOT,
    seed: int = 0,
) -> dict[str, Any]:
    """Macro-AUROC gain of the candidate over the incumbent with a paired, stratified
    bootstrap 95 % interval; ``passes`` is rule 2."""
    rng = np.random.default_rng(seed)
    strata = [
        np.nonzero((sources == s) & (y == lab))[0]
        for s in sorted(set(sources.tolist()))
        for lab in (0, 1)
    ]
    gains = []
    for _ in range(n_boot):
        idx = np.concatenate(
            [rng.choice(st, size=len(st), replace=True) for st in strata if len(st)]
        )
        gains.append(
            macro_auroc(y[idx], p_candidate[idx], sources[idx])
            - macro_auroc(y[idx], p_incumbent[idx], sources[idx])
        )
    lo, hi = np.quantile(gains, [0.025, 0.975])
    gain = macro_auroc(y, p_candidate, sources) - macro_auroc(y, p_incumbent, sources)
    return {
        "gain": round(gain, 4),
        "ci95": [round(float(lo), 4), round(float(hi), 4)],
        "passes": bool(lo > 0),
    }


def predictions(model_dir: Path, split: str, args: argparse.Namespace) -> dict[str, Any]:
    """Labels, probabilities and sources of ``split`` through ``model_dir``'s export, kept in
    ``--predictions-dir`` when given (keyed by the export's sha256, so a re-export is
    predicted again)."""
    from model.artifact import read_card
    from model.inference import Classifier, ImageError
    from model.training.data import integrity_problem, read_all
    from model.training.train import select

    card = read_card(model_dir)
    sha = (card.extra.get("export") or {}).get("sha256")
    cache = (
        Path(args.predictions_dir) / f"{(sha or 'none')[:16]}-{split}.json"
        if args.predictions_dir
        else None
    )
    if cache is not None and cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("export_sha256") == sha and sha:
            return {k: np.array(saved[k]) for k in ("y", "p", "sources")}
    records = read_all(args.bfmr_dir, args.fracatlas_dir)
    keys = set(select(records, args.split_mode, args.split)[split])
    clf = Classifier.load(model_dir)
    y, p, src = [], [], []
    for rec in records:
        if rec.key not in keys or integrity_problem(rec.path):
            continue
        try:
            p.append(clf.predict(clf.prepare(rec.path)))
        except ImageError:
            continue
        y.append(rec.label)
        src.append(rec.source)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        saved = {"export_sha256": sha, "y": y, "p": p, "sources": src}
        cache.write_text(json.dumps(saved) + "\n")
    return {"y": np.array(y), "p": np.array(p), "sources": np.array(src)}


def compare(
    incumbent: Path, candidates: Sequence[Path], args: argparse.Namespace
) -> dict[str, Any]:
    from model.artifact import read_card
    from model.training.metrics import binary_metrics

    inc = predictions(incumbent, "val", args)
    rows = []
    for cand in candidates:
        c = predictions(cand, "val", args)
        if not (np.array_equal(c["y"], inc["y"]) and np.array_equal(c["sources"], inc["sources"])):
            raise ValueError(f"{cand} was validated on other images than {incumbent}")
        row: dict[str, Any] = {
            "candidate": str(cand),
            "val_macro_auroc": round(macro_auroc(c["y"], c["p"], c["sources"]), 4),
            "vs_incumbent": paired_gain(inc["y"], inc["sources"], inc["p"], c["p"]),
        }
        t = predictions(cand, "test", args)  # rule 4: reported, never chosen on
        thr = read_card(cand).threshold
        row["test"] = {
            "macro_auroc": round(macro_auroc(t["y"], t["p"], t["sources"]), 4),
            "all": binary_metrics(t["y"], t["p"], thr),
            **{
                s: binary_metrics(t["y"][t["sources"] == s], t["p"][t["sources"] == s], thr)
                for s in sorted(set(t["sources"].tolist()))
            },
        }
        rows.append(row)
    return {
        "incumbent": str(incumbent),
        "incumbent_val_macro_auroc": round(macro_auroc(inc["y"], inc["p"], inc["sources"]), 4),
        "candidates": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    from model.training.threshold import add_data_arguments

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--incumbent", type=Path, required=True)
    parser.add_argument("--candidate", type=Path, action="append", required=True)
    add_data_arguments(parser)
    parser.add_argument("--predictions-dir", type=Path, default=None)
    args = parser.parse_args(argv)
    print(json.dumps(compare(args.incumbent, args.candidate, args), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
