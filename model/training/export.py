"""Ship-time export of an artifact's Keras network to LiteRT, the format the node loads.

``python -m model.training.export --model DIR [--check-split val]`` writes ``DIR/model.tflite``
from ``DIR/best_model.keras`` with the card's test-time augmentation inside the graph (for
``d4``: the input image's 8 rotations by 90 degrees / mirror images as one batch of 8, and
the mean of their probabilities) and the class activation map beside the probability
(:func:`keras_forward`), records it in the card (:class:`model.artifact.ExportInfo`:
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

#: Names of the export's two outputs (the graph returns them as a dict).
PROBABILITY_OUTPUT = "probability"
MAP_OUTPUT = "map"


def cam_parts(model: Any) -> tuple[Any, Any, Any] | None:
    """The network split for its class activation map (CAM, Zhou et al. 2016): a model from
    the image to the last feature maps (the base's output), the global average pool and the
    sigmoid dense unit.

    For base -> GlobalAveragePooling2D -> Dropout -> Dense(1, sigmoid) the logit is
    ``mean_ij(F_ij) . w + b = mean_ij(F_ij . w + b)``, so ``CAM_ij = F_ij . w + b`` is exact
    (no gradients) and its mean is the logit. None for any other head (an ensemble of
    several heads, say), whose map would not be exact: such a network is exported without
    a map.
    """
    import keras

    pools = [la for la in model.layers if isinstance(la, keras.layers.GlobalAveragePooling2D)]
    dense = model.layers[-1]
    if (
        len(pools) != 1
        or not isinstance(dense, keras.layers.Dense)
        or dense.units != 1
        or keras.activations.serialize(dense.activation) != "sigmoid"
        or not all(
            isinstance(la, keras.layers.Dropout)
            for la in model.layers[model.layers.index(pools[0]) + 1 : -1]
        )
    ):
        return None
    features = keras.Model(model.inputs, pools[0].input, name="last_feature_maps")
    return features, pools[0], dense


def keras_forward(model_dir: Path, card: ModelCard | None = None) -> Any:
    """The Keras network of ``model_dir`` with the card's test-time augmentation, as one
    traced ``tf.function`` over ``(1, size, size, 3)`` images 0..255 returning a dict:
    ``probability`` ``(1,)`` and ``map`` ``(1, h, w)``, the class activation map (logit units,
    see :func:`cam_parts`; 7x7 at 224 px) in the input image's orientation. The graph that is
    exported, and the reference it is checked against. A network :func:`cam_parts` cannot
    split (an ensemble) returns the probability alone.

    For ``d4`` the probability is the mean over the 8 views, as before; each view's map is
    turned back (the inverse of its rotation, then of its mirroring) before the 8 are
    averaged, so a structure lights up where it is in the image the user sees.
    """
    import keras
    import tensorflow as tf

    card = card or read_card(model_dir)
    model = keras.models.load_model(Path(model_dir) / MODEL_FILE, compile=False)
    parts = cam_parts(model)
    size = card.input_size
    spec = tf.TensorSpec((1, size, size, 3), tf.float32, name="image")
    if parts is None:
        print(
            f"warning: network {model.name!r} is not base + global average pooling + "
            "Dense(1, sigmoid): exported without a class activation map",
            file=sys.stderr,
        )
        return _probability_only(model, card, spec)
    features, pool, dense = parts

    def heads(batch: Any) -> tuple[Any, Any]:
        # one pass through the base serves both: probability = dense(pool(F)) as in the
        # Keras model (dropout is the identity at inference), CAM = F . w + b
        f = features(batch, training=False)
        p = tf.reshape(dense(pool(f)), (-1,))
        kernel, bias = dense.kernel, dense.bias
        cam = tf.tensordot(f, kernel[:, 0], axes=[[3], [0]]) + bias[0]
        return p, cam

    if card.test_time_augmentation == "d4":

        def forward(x: Any) -> Any:
            # the 8 rotations / mirror images of the image in one batch, then their mean
            mirrored = tf.reverse(x, [2])
            views = [tf.image.rot90(v, k) for v in (x, mirrored) for k in range(4)]
            p, cam = heads(tf.concat(views, 0))
            cam = cam[..., tf.newaxis]
            undone = []
            for i in range(8):
                m = tf.image.rot90(cam[i : i + 1], (4 - i % 4) % 4)  # undo the rotation
                undone.append(tf.reverse(m, [2]) if i >= 4 else m)  # then the mirroring
            cam_mean = tf.reduce_mean(tf.concat(undone, 0), axis=0)[tf.newaxis, ..., 0]
            return {
                PROBABILITY_OUTPUT: tf.reduce_mean(tf.reshape(p, (8, -1)), axis=0),
                MAP_OUTPUT: cam_mean,
            }

    else:

        def forward(x: Any) -> Any:
            p, cam = heads(x)
            return {PROBABILITY_OUTPUT: p, MAP_OUTPUT: cam}

    return tf.function(forward, input_signature=[spec])


def _probability_only(model: Any, card: ModelCard, spec: Any) -> Any:
    """The forward pass of a network without an exact map: the probability alone."""
    import tensorflow as tf

    if card.test_time_augmentation == "d4":

        def forward(x: Any) -> Any:
            mirrored = tf.reverse(x, [2])
            views = [tf.image.rot90(v, k) for v in (x, mirrored) for k in range(4)]
            p = model(tf.concat(views, 0), training=False)
            return {PROBABILITY_OUTPUT: tf.reduce_mean(tf.reshape(p, (8, -1)), axis=0)}

    else:

        def forward(x: Any) -> Any:
            return {PROBABILITY_OUTPUT: tf.reshape(model(x, training=False), (-1,))}

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
        class_activation_map=MAP_OUTPUT in forward.get_concrete_function().structured_outputs,
    )
    card = dataclasses.replace(card, export=info)
    write_card(model_dir, card)
    return card


def max_differences(model_dir: Path, files: Sequence[Path]) -> tuple[float, float | None, int]:
    """Largest |export - Keras| probability and class activation map value over ``files``
    (unreadable ones skipped; the map's None for an export without one), and the number of
    files compared; both see the same preprocessed input."""
    from model.inference import Classifier, ImageError

    clf = Classifier.load(model_dir)
    forward = keras_forward(model_dir, clf.card)
    worst, worst_map, n = 0.0, 0.0, 0
    for path in files:
        try:
            image = clf.prepare(path)
        except ImageError:
            continue
        out = forward(image[np.newaxis].astype(np.float32))
        keras_p = float(np.asarray(out[PROBABILITY_OUTPUT])[0])
        if clf.has_map:
            probability, cam = clf.predict_with_map(image)
            keras_map = np.asarray(out[MAP_OUTPUT])[0]
            worst_map = max(worst_map, float(np.abs(cam - keras_map).max()))
        else:
            probability = clf.predict(image)
        worst = max(worst, abs(probability - keras_p))
        n += 1
    return worst, (worst_map if clf.has_map else None), n


def max_difference(model_dir: Path, files: Sequence[Path]) -> tuple[float, int]:
    """Largest |export - Keras| probability over ``files`` and the number compared."""
    worst, _, n = max_differences(model_dir, files)
    return worst, n


def record_check(
    model_dir: Path, worst: float, n: int, worst_map: float | None = None
) -> ModelCard:
    card = read_card(model_dir)
    assert card.export is not None
    info = dataclasses.replace(
        card.export,
        max_abs_difference=worst,
        checked_files=n,
        max_abs_map_difference=worst_map,
    )
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
        worst, worst_map, n = max_differences(args.model, files)
        card = record_check(args.model, worst, n, worst_map)
        assert card.export is not None
        result = {"export": dataclasses.asdict(card.export), "split": args.check_split}
    from model.training.card import refresh_export_section

    refresh_export_section(args.model, card)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
