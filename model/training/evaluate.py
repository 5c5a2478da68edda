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
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from model.imaging import PreprocessError, load_network_input
from model.inference import Classifier
from model.training.data import read_labelled_csv
from model.training.metrics import binary_metrics

REPORT_FILE = "evaluation.json"


def _load(path: Path, size: int) -> np.ndarray | str:
    try:
        return load_network_input(path, size)
    except PreprocessError as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable file {path.name}: {exc}"


def predict_files(
    classifier: Classifier, paths: Sequence[Path], batch_size: int = 16, workers: int = 2
) -> Iterator[tuple[Path, float | str]]:
    """Probabilities in input order; a failing file yields its error message instead.

    Decoding runs in a small thread pool (Pillow and pydicom's decoders release the GIL) while
    the network classifies the previous batch.
    """
    size = classifier.input_size
    with ThreadPoolExecutor(max_workers=workers) as pool:
        loaded = pool.map(lambda p: _load(p, size), paths)
        batch: list[tuple[Path, np.ndarray]] = []
        pending: list[tuple[Path, float | str]] = []
        for path, item in zip(paths, loaded, strict=True):
            if isinstance(item, str):
                pending.append((path, item))
            else:
                batch.append((path, item))
                pending.append((path, "pending"))
            if len(batch) >= batch_size:
                yield from _flush(classifier, batch, pending)
        yield from _flush(classifier, batch, pending)


def _flush(
    classifier: Classifier,
    batch: list[tuple[Path, np.ndarray]],
    pending: list[tuple[Path, float | str]],
) -> Iterator[tuple[Path, float | str]]:
    probs = iter(
        classifier.predict_batch(np.stack([x for _, x in batch])).tolist() if batch else []
    )
    for path, state in pending:
        yield path, (next(probs) if state == "pending" else state)
    batch.clear()
    pending.clear()


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

        model_dir = (settings or Settings()).model_dir
        if model_dir is None:
            raise SystemExit("no model: pass --model DIR")
    report = evaluate(model_dir, args.manifest, args.out, args.title)
    keys = ("n", "accuracy", "auroc", "sensitivity", "specificity", "precision", "f1")
    print(json.dumps({k: report[k] for k in keys}))
    print(f"confusion matrix [[tn, fp], [fn, tp]]: {report['confusion_matrix']['matrix']}")
    print(f"report: {Path(report['out_dir']) / REPORT_FILE}; {len(report['errors'])} unreadable")
    return 0
