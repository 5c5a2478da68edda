"""Ship-time export of an artifact's Keras network to LiteRT, the format the node loads.

``python -m model.training.export --model DIR [--check-split val]`` writes ``DIR/model.tflite``
from ``DIR/best_model.keras`` with the card's test-time augmentation inside the graph (for
``d4``: the input image's 8 rotations by 90 degrees / mirror images as one batch of 8, and
the mean of their probabilities), records it in the card (:class:`model.artifact.ExportInfo`:
file, sha256, input size, augmentation) and, with ``--check-split``, the largest difference
between the export's and Keras' probability over that split's files.

Why LiteRT and not ONNX Runtime: measured here on the 1.1.0 network with D4 (one image, 8
views, 2 threads), LiteRT answered in 21 ms with a process RSS of 114 MB, ONNX Runtime
(tf2onnx, opset 17) in 28 ms with 178 MB; both matched Keras to 1e-6. ``model.benchmark``
prints the LiteRT figures against Keras.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.artifact import (
    EXPORT_FILE,
    MODEL_FILE,
    ExportInfo,
    ModelCard,
    file_sha256,
    read_card,
    write_card,
)


def keras_forward(model_dir: Path, card: ModelCard | None = None) -> Any:
    """The Keras network of ``model_dir`` with the card's test-time augmentation, as one
    traced ``tf.function`` over ``(1, size, size, 3)`` images 0..255 returning ``(1,)``
    probabilities: the graph that is exported, and the reference it is checked against."""
    import keras
    import tensorflow as tf

    card = card or read_card(model_dir)
    model = keras.models.load_model(Path(model_dir) / MODEL_FILE, compile=False)
    size = card.input_size
    spec = tf.TensorSpec((1, size, size, 3), tf.float32, name="image")
    if card.test_time_augmentation == "d4":

        def forward(x: Any) -> Any:
            # the 8 rotations / mirror images of the image in one batch, then their mean
            mirrored = tf.reverse(x, [2])
            views = [tf.image.rot90(v, k) for v in (x, mirrored) for k in range(4)]
            p = model(tf.concat(views, 0), training=False)
            return tf.reduce_mean(tf.reshape(p, (8, -1)), axis=0)

    else:

        def forward(x: Any) -> Any:
            return tf.reshape(model(x, training=False), (-1,))

    return tf.function(forward, input_signature=[spec])


def export(model_dir: Path) -> ModelCard:
    """Write ``model_dir/model.tflite`` from the Keras network and record it in the card."""
    import tensorflow as tf

    model_dir = Path(model_dir)
    card = read_card(model_dir)
    forward = keras_forward(model_dir, card)
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [forward.get_concrete_function()], forward
    )
    # float32 throughout: no quantisation, so the export answers what Keras answers
    flatbuffer = converter.convert()
    target = model_dir / EXPORT_FILE
    fd, tmp = tempfile.mkstemp(dir=model_dir, prefix=".export-")
    with os.fdopen(fd, "wb") as f:
        f.write(flatbuffer)
    os.replace(tmp, target)
    os.chmod(target, 0o644)
    info = ExportInfo(
        file=EXPORT_FILE,
        sha256=file_sha256(target),
        input_size=card.input_size,
        test_time_augmentation=card.test_time_augmentation,
    )
    card = dataclasses.replace(card, export=info)
    write_card(model_dir, card)
    return card


def max_difference(model_dir: Path, files: Sequence[Path]) -> tuple[float, int]:
    """Largest |export - Keras| probability over ``files`` (unreadable ones skipped) and the
    number of files compared; both see the same preprocessed input."""
    from model.inference import Classifier, ImageError

    clf = Classifier.load(model_dir)
    forward = keras_forward(model_dir, clf.card)
    worst, n = 0.0, 0
    for path in files:
        try:
            image = clf.prepare(path)
        except ImageError:
            continue
        keras_p = float(np.asarray(forward(image[np.newaxis].astype(np.float32)))[0])
        worst = max(worst, abs(clf.predict(image) - keras_p))
        n += 1
    return worst, n


def record_check(model_dir: Path, worst: float, n: int) -> ModelCard:
    card = read_card(model_dir)
    assert card.export is not None
    info = dataclasses.replace(card.export, max_abs_difference=worst, checked_files=n)
    card = dataclasses.replace(card, export=info)
    write_card(model_dir, card)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    from model.training.data import read_all
    from model.training.threshold import add_data_arguments
    from model.training.train import select

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, required=True)
    p.add_argument(
        "--check-split",
        choices=("train", "val", "test"),
        default=None,
        help="compare the export with Keras on every file of this split",
    )
    add_data_arguments(p)
    args = p.parse_args(argv)
    card = export(args.model)
    assert card.export is not None
    result: dict[str, Any] = {"export": dataclasses.asdict(card.export)}
    if args.check_split:
        records = read_all(args.bfmr_dir, args.fracatlas_dir)
        keys = set(select(records, args.split_mode, args.split)[args.check_split])
        files = [r.path for r in records if r.key in keys]
        worst, n = max_difference(args.model, files)
        card = record_check(args.model, worst, n)
        assert card.export is not None
        result = {"export": dataclasses.asdict(card.export), "split": args.check_split}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
