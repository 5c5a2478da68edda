"""CPU figures of the one classification path: ``python -m model.benchmark [--model DIR]``.

Printed side by side in one run (nothing asserted):

- **inference**: the LiteRT export against the Keras network it was made from (the same
  graph: the card's test-time augmentation, for ``d4`` one batch of 8 views per image), on
  the same preprocessed images: milliseconds per image (medians over alternating blocks,
  each engine timed alone after a rest), the speed-up, and the largest
  probability difference (the card holds the figure over every validation file). The Keras
  half needs the ``[train]`` extra and is left out without it; and the export with one
  thread against every core (how far it is bound by arithmetic);
- **worker path** (:meth:`Classifier.classify_file`: read, decode, render, resize, infer) on
  real pictures from the bone fracture set and on the decodable DICOM samples (radiographs
  up to ~4,000 x 4,000 pixels), split into preprocessing and inference time, so that it says
  where the time goes; and ``fracture-triage classify``'s pipeline (:func:`predict_files`,
  decoding in threads while the network runs);
- **load**: seconds to load the export; first of all, the CPU and its vector extensions,
  on which the export/Keras ratio depends.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.artifact import resolve_model_dir
from model.inference import Classifier, ImageError, predict_files


def picture_files(bfmr_dir: Path, n: int) -> list[Path]:
    with open(bfmr_dir / "manifest.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    seen: dict[str, Path] = {}
    for row in rows:  # distinct files, in manifest order (a mix of sizes and formats)
        seen.setdefault(row["sha256"], bfmr_dir / row["file"])
    return list(seen.values())[:: max(1, len(seen) // n)][:n]


def dicom_files(classifier: Classifier, samples_dir: Path) -> list[Path]:
    """The samples the worker can classify (the ``BAD_`` ones and undecodable ones left out)."""
    out = []
    for path in sorted(samples_dir.glob("*.dcm")):
        if path.name.startswith("BAD_"):
            continue
        try:
            classifier.prepare(path)
        except ImageError:
            continue
        out.append(path)
    return out


def worker_path(classifier: Classifier, files: list[Path], label: str) -> dict[str, float]:
    classifier.classify_file(files[0])  # warm-up
    pre, inf = [], []
    t0 = time.perf_counter()
    for f in files:
        p = classifier.classify_file(f)
        pre.append(p.preprocess_ms)
        inf.append(p.inference_ms)
    single = len(files) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    results = list(predict_files(classifier, files))
    pipelined = len(files) / (time.perf_counter() - t0)
    row = {
        "files": len(files),
        "errors": sum(1 for _, r in results if isinstance(r, str)),
        "classify_file_img_per_s": round(single, 2),
        "preprocess_ms_mean": round(float(np.mean(pre)), 1),
        "inference_ms_mean": round(float(np.mean(inf)), 1),
        "preprocess_share": round(sum(pre) / (sum(pre) + sum(inf)), 3),
        "classify_pipelined_img_per_s": round(pipelined, 2),
    }
    print(f"worker path, {label}: {json.dumps(row)}", flush=True)
    return row


#: Rounds of the export/Keras comparison: each round times every image through the export,
#: then through Keras, so drift in the machine's load falls on both alike.
ROUNDS = 3

#: Seconds of rest before each block. TensorFlow's and XNNPACK's thread pools spin-wait for a
#: while after their last job; timed back to back, each engine's idle threads take CPU from the
#: other (interleaving image by image measured the export ~40 % slower than it runs alone,
#: which is how the worker runs it: without TensorFlow in the process).
REST_S = 0.2


def _block_ms(run: Any, inputs: list[Any]) -> list[float]:
    time.sleep(REST_S)
    out = []
    for x in inputs:
        t0 = time.perf_counter()
        run(x)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def export_vs_keras(model_dir: Path, classifier: Classifier, files: list[Path]) -> dict[str, Any]:
    """Milliseconds per image (median over :data:`ROUNDS` alternating blocks) of the export
    and of Keras on the same inputs, and their largest difference; Keras' figures only where
    TensorFlow is installed."""
    images = [classifier.prepare(f) for f in files]
    for x in images[:3]:  # warm-up
        classifier.predict(x)
    export_p = [classifier.predict(x) for x in images]
    row: dict[str, Any] = {
        "images": len(images),
        "views_per_image": 8 if classifier.card.test_time_augmentation == "d4" else 1,
        "rounds": ROUNDS,
    }
    if importlib.util.find_spec("tensorflow") is None:
        export_ms = _block_ms(classifier.predict, images * ROUNDS)
        row["export_ms_per_image"] = round(float(np.median(export_ms)), 2)
        row["keras"] = "not measured: TensorFlow is not installed (the [train] extra)"
    else:
        from model.training.export import PROBABILITY_OUTPUT, keras_forward

        forward = keras_forward(model_dir, classifier.card)
        batch = [x[np.newaxis].astype(np.float32) for x in images]
        for x in batch[:3]:  # warm-up: traces the graph
            forward(x)
        keras_p = [float(np.asarray(forward(x)[PROBABILITY_OUTPUT])[0]) for x in batch]
        export_ms, keras_ms = [], []
        for _ in range(ROUNDS):
            export_ms += _block_ms(classifier.predict, images)
            keras_ms += _block_ms(lambda x: np.asarray(forward(x)[PROBABILITY_OUTPUT]), batch)
        export_median = float(np.median(export_ms))
        keras_median = float(np.median(keras_ms))
        row["export_ms_per_image"] = round(export_median, 2)
        row["keras_ms_per_image"] = round(keras_median, 2)
        row["speedup_export_over_keras"] = round(keras_median / export_median, 2)
        row["speedup_per_round"] = [
            round(
                float(np.median(keras_ms[i : i + len(images)]))
                / float(np.median(export_ms[i : i + len(images)])),
                2,
            )
            for i in range(0, len(export_ms), len(images))
        ]
        row["max_abs_probability_difference"] = float(
            np.max(np.abs(np.array(export_p) - np.array(keras_p)))
        )
    if classifier.card.export is not None:
        row["card_max_abs_difference"] = classifier.card.export.max_abs_difference
        row["card_checked_files"] = classifier.card.export.checked_files
    print(f"inference, export vs Keras: {json.dumps(row)}", flush=True)
    return row


def thread_scaling(model_dir: Path, classifier: Classifier, files: list[Path]) -> dict[str, Any]:
    """The export's milliseconds per image with one thread against every core: how far the
    worker's inference is bound by arithmetic (a ratio near the core count: fully)."""
    images = [classifier.prepare(f) for f in files]
    one = Classifier.load(model_dir, num_threads=1)
    for x in images[:3]:  # warm-up
        one.predict(x)
    row: dict[str, Any] = {"cores": len(os.sched_getaffinity(0))}
    all_ms, one_ms = [], []
    for _ in range(ROUNDS):
        all_ms += _block_ms(classifier.predict, images)
        one_ms += _block_ms(one.predict, images)
    row["export_ms_per_image_every_core"] = round(float(np.median(all_ms)), 2)
    row["export_ms_per_image_one_thread"] = round(float(np.median(one_ms)), 2)
    row["speedup_every_core_over_one"] = round(float(np.median(one_ms) / np.median(all_ms)), 2)
    print(f"inference, export threads: {json.dumps(row)}", flush=True)
    return row


#: Vector extensions that decide how fast each engine's kernels run (TensorFlow's oneDNN and
#: XNNPACK pick theirs at run time), in the order they are reported.
_VECTOR_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")


def cpu_description() -> str:
    """The CPU's model name and its vector extensions (``/proc/cpuinfo``): the export/Keras
    ratio depends on them (see the README's Benchmarks)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown CPU"
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (line.partition(":") for line in text.splitlines())
        if value
    )
    flags = set(fields.get("flags", "").split())
    vector = [f for f in _VECTOR_FLAGS if f in flags]
    return f"{fields.get('model name', 'unknown CPU')} ({' '.join(vector) or 'no AVX2'})"


def main(argv: Sequence[str] | None = None) -> int:
    repo = Path(__file__).resolve().parent.parent
    shared = repo.parent / "shared"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None, help="artifact dir (default: shipped)")
    p.add_argument("--bfmr-dir", type=Path, default=shared / "datasets/bone-fracture-multi-region")
    p.add_argument("--dicom-dir", type=Path, default=shared / "dicom-samples")
    p.add_argument("-n", type=int, default=64, help="pictures to classify")
    p.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = p.parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    t0 = time.perf_counter()
    classifier = Classifier.load(model_dir)
    load_s = time.perf_counter() - t0
    load_average = os.getloadavg()[0]
    cpu = cpu_description()
    print(
        f"model {classifier.card.name} {classifier.card.version} input {classifier.input_size} "
        f"TTA {classifier.card.test_time_augmentation}; CPU {cpu}, {os.cpu_count()} cores; "
        f"load average {load_average:.1f}; export loaded in {load_s:.2f} s",
        flush=True,
    )
    pictures = picture_files(args.bfmr_dir, args.n)
    result: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "load_average_at_start": round(load_average, 2),
        "test_time_augmentation": classifier.card.test_time_augmentation,
        "export_load_s": round(load_s, 3),
    }
    if load_average > (os.cpu_count() or 1):
        result["note"] = "load average above the core count: other jobs shared the CPU"
    result["inference"] = export_vs_keras(model_dir, classifier, pictures[:16])
    result["export_thread_scaling"] = thread_scaling(model_dir, classifier, pictures[:16])
    result["pictures"] = worker_path(classifier, pictures, "pictures (PNG/JPEG)")
    dicoms = dicom_files(classifier, args.dicom_dir)
    if dicoms:
        result["dicom_samples"] = worker_path(classifier, dicoms, "DICOM samples")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
