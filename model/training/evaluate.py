"""Evaluate a model artifact on a labelled manifest: JSON report and plots.

``fracture-triage evaluate --model DIR --manifest CSV [--out DIR]``: the CSV has at least the
columns ``file`` and ``label`` (``fractured`` / ``not fractured``), paths relative to the CSV.
Every file goes through the same preprocessing as the worker (DICOM or picture). Files that
cannot be read are listed in the report and left out of the figures; they do not stop the run.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from model.inference import Classifier, predict_files
from model.training.data import read_labelled_csv
from model.training.metrics import binary_metrics

REPORT_FILE = "evaluation.json"


def evaluate(
    model_dir: Path, manifest: Path, out_dir: Path | None = None, title: str | None = None
) -> dict[str, Any]:
    from model.training.plots import confusion_plot, history_plot, roc_plot

    t0 = time.time()
    classifier = Classifier.load(model_dir)
    items = read_labelled_csv(manifest)
    y, p, errors, predictions = [], [], [], []
    for (path, label), (_, result) in zip(
        items, predict_files(classifier, [i[0] for i in items]), strict=True
    ):
        if isinstance(result, str):
            errors.append({"file": str(path), "error": result})
        else:
            y.append(label)
            p.append(result)
            predictions.append({"file": str(path), "label": label, "probability": round(result, 6)})
    ya, pa = np.asarray(y), np.asarray(p)
    report: dict[str, Any] = {
        "model": {
            "dir": str(model_dir),
            "name": classifier.card.name,
            "version": classifier.card.version,
            "uid": classifier.card.uid,
            "input_size": classifier.input_size,
        },
        "manifest": str(manifest),
        **binary_metrics(ya, pa, classifier.threshold),
        "errors": errors,
        "seconds": round(time.time() - t0, 1),
        "predictions": predictions,
    }
    report["images_per_second"] = round(len(items) / max(report["seconds"], 1e-9), 2)
    out = (
        Path(out_dir)
        if out_dir
        else Path(manifest).with_suffix("").with_name(f"evaluation-{Path(manifest).stem}")
    )
    out.mkdir(parents=True, exist_ok=True)
    title = title or f"{classifier.card.name} {classifier.card.version} on {Path(manifest).name}"
    plots = {}
    if ya.any() and (~ya.astype(bool)).any():
        plots["roc"] = roc_plot(ya, pa, classifier.threshold, out / "roc.png", title).name
    plots["confusion_matrix"] = confusion_plot(
        report["confusion_matrix"]["matrix"], out / "confusion_matrix.png", title
    ).name
    history = Path(model_dir) / "history.json"
    if history.is_file():
        plots["training_curves"] = history_plot(
            json.loads(history.read_text()), out / "training_curves.png", classifier.card.name
        ).name
    report["plots"] = plots
    (out / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    report["out_dir"] = str(out)
    return report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="artifact directory")
    parser.add_argument("--manifest", type=Path, required=True, help="CSV with file,label")
    parser.add_argument("--out", type=Path, default=None, help="report directory")
    parser.add_argument("--title", default=None)


def run(args: argparse.Namespace, settings: Any = None) -> int:
    model_dir = args.model
    if model_dir is None:
        from fracture_triage.settings import Settings
        from model.artifact import resolve_model_dir

        model_dir = resolve_model_dir((settings or Settings()).model_dir)
    report = evaluate(model_dir, args.manifest, args.out, args.title)
    keys = ("n", "accuracy", "auroc", "sensitivity", "specificity", "precision", "f1")
    print(json.dumps({k: report[k] for k in keys}))
    print(f"confusion matrix [[tn, fp], [fn, tp]]: {report['confusion_matrix']['matrix']}")
    print(f"report: {Path(report['out_dir']) / REPORT_FILE}; {len(report['errors'])} unreadable")
    return 0
