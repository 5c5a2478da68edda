"""CPU throughput of classification: ``python -m model.benchmark [--model DIR]``.

Prints images per second for preprocessing alone, for one file at a time
(:meth:`Classifier.classify_file`, the worker's path) and for the batched pipeline that
``fracture-triage classify`` uses, on real pictures from the bone fracture set and on the
decodable DICOM samples (radiographs of up to ~4,000 x 4,000 pixels).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from model.imaging import PreprocessError, load_network_input
from model.inference import Classifier
from model.training.evaluate import predict_files


def picture_files(bfmr_dir: Path, n: int) -> list[Path]:
    with open(bfmr_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    seen: dict[str, Path] = {}
    for row in rows:  # distinct files, in manifest order (a mix of sizes and formats)
        seen.setdefault(row["sha256"], bfmr_dir / row["file"])
    return list(seen.values())[:: max(1, len(seen) // n)][:n]


def dicom_files(samples_dir: Path) -> list[Path]:
    out = []
    for path in sorted(samples_dir.glob("*.dcm")):
        if path.name.startswith("BAD_"):
            continue
        try:
            load_network_input(path, 64)
        except (PreprocessError, OSError, ValueError):
            continue
        out.append(path)
    return out


def measure(classifier: Classifier, files: list[Path], label: str) -> dict[str, float]:
    size = classifier.input_size
    t0 = time.perf_counter()
    for f in files:
        load_network_input(f, size)
    pre = len(files) / (time.perf_counter() - t0)
    classifier.classify_file(files[0])  # warm-up (graph tracing)
    t0 = time.perf_counter()
    for f in files:
        classifier.classify_file(f)
    single = len(files) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    results = list(predict_files(classifier, files, batch_size=16))
    batched = len(files) / (time.perf_counter() - t0)
    errors = sum(1 for _, r in results if isinstance(r, str))
    row = {
        "files": len(files),
        "errors": errors,
        "preprocess_img_per_s": round(pre, 2),
        "classify_file_img_per_s": round(single, 2),
        "classify_batched_img_per_s": round(batched, 2),
    }
    print(f"{label}: {json.dumps(row)}", flush=True)
    return row


def main(argv: Sequence[str] | None = None) -> int:
    repo = Path(__file__).resolve().parent.parent
    shared = repo.parent / "shared"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--bfmr-dir", type=Path, default=shared / "datasets/bone-fracture-multi-region")
    p.add_argument("--dicom-dir", type=Path, default=shared / "dicom-samples")
    p.add_argument("-n", type=int, default=64, help="pictures to classify")
    p.add_argument("--out", type=Path, default=None, help="write the figures as JSON")
    args = p.parse_args(argv)
    model_dir = args.model
    if model_dir is None:
        from fracture_triage.settings import Settings

        model_dir = Settings().model_dir
    classifier = Classifier.load(model_dir)
    print(
        f"model {classifier.card.name} {classifier.card.version} input {classifier.input_size}; "
        f"CPU cores {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    result: dict[str, object] = {
        "cpu_cores": os.cpu_count(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
        "test_time_augmentation": classifier.card.test_time_augmentation,
        # the 1-minute load average includes the model load just done; above the core count
        # other jobs were competing for the CPU and the figures are low
        "note": "load average above the core count: other jobs shared the CPU",
    }
    if os.getloadavg()[0] <= (os.cpu_count() or 1):
        result.pop("note")
    result["pictures"] = measure(
        classifier, picture_files(args.bfmr_dir, args.n), "pictures (PNG/JPEG)"
    )
    dicoms = dicom_files(args.dicom_dir)
    if dicoms:
        result["dicom_samples"] = measure(classifier, dicoms, "DICOM samples")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
