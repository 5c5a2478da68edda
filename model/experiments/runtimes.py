"""Which inference runtime the node ships: LiteRT against ONNX Runtime, on the same network.

``python -m model.experiments.runtimes [--model DIR] [-n 16]`` (needs the ``[train]`` extra
plus ``pip install tf2onnx onnxruntime``) converts the artifact's Keras network, with the
card's test-time augmentation in the graph, to LiteRT (``model.training.export``'s graph) and to
ONNX (tf2onnx, opset 17), then for each runs a fresh Python process that imports only that
runtime and numpy and prints: seconds to load, milliseconds per image (one image = its 8 D4
views for ``d4``), the largest probability difference to Keras on the same inputs, and the
process's peak RSS. The choice recorded in ``model/training/export.py`` came from this.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model.artifact import read_card, resolve_model_dir

_PROBE = r"""
import json, sys, time
import numpy as np
kind, path, inputs, ref = sys.argv[1:5]
x, ref = np.load(inputs), np.load(ref)
t0 = time.perf_counter()
if kind == "onnx":
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    s = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    run = lambda a: s.run(None, {name: a})[0].reshape(-1)[0]
else:
    from ai_edge_litert.interpreter import Interpreter
    it = Interpreter(model_path=path, num_threads=2)
    it.allocate_tensors()
    i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
    def run(a):
        it.set_tensor(i, a); it.invoke(); return it.get_tensor(o).reshape(-1)[0]
load_s = time.perf_counter() - t0
run(x[:1])
t0 = time.perf_counter()
p = np.array([run(x[k : k + 1]) for k in range(len(x))])
ms = (time.perf_counter() - t0) * 1000 / len(x)
# VmHWM, not ru_maxrss: the latter survives exec and would report the parent's TensorFlow
status = open("/proc/self/status").read()
hwm = round(int(status.split("VmHWM:")[1].split()[0]) / 1024, 1)
print(json.dumps({"load_s": round(load_s, 3), "ms_per_image": round(ms, 2),
    "max_abs_difference_to_keras": float(np.abs(p - ref).max()),
    "peak_rss_mb": hwm}))
"""


def main(argv: Sequence[str] | None = None) -> int:
    import tensorflow as tf
    import tf2onnx

    from model.benchmark import picture_files
    from model.inference import Classifier
    from model.training.export import PROBABILITY_OUTPUT, keras_forward

    repo = Path(__file__).resolve().parents[2]
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=None)
    p.add_argument(
        "--bfmr-dir", type=Path, default=repo.parent / "shared/datasets/bone-fracture-multi-region"
    )
    p.add_argument("-n", type=int, default=16, help="pictures to classify")
    args = p.parse_args(argv)
    model_dir = resolve_model_dir(args.model)
    card = read_card(model_dir)
    clf = Classifier.load(model_dir)  # only for its preprocessing
    x = np.stack([clf.prepare(f) for f in picture_files(args.bfmr_dir, args.n)]).astype(np.float32)
    both = keras_forward(model_dir, card)
    # the probability alone, as the runtimes compared then (the export now adds the map)
    forward = tf.function(
        lambda image: both(image)[PROBABILITY_OUTPUT],
        input_signature=both.input_signature,
    )
    ref = np.array([float(np.asarray(forward(x[k : k + 1]))[0]) for k in range(len(x))])
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        np.save(out / "x.npy", x)
        np.save(out / "ref.npy", ref)
        concrete = forward.get_concrete_function()
        converter = tf.lite.TFLiteConverter.from_concrete_functions([concrete], forward)
        (out / "m.tflite").write_bytes(converter.convert())
        tf2onnx.convert.from_function(
            forward,
            input_signature=concrete.structured_input_signature[0],
            opset=17,
            output_path=str(out / "m.onnx"),
        )
        result: dict[str, object] = {
            "model": f"{card.name} {card.version}",
            "tta": card.test_time_augmentation,
        }
        for kind, file in (("litert", "m.tflite"), ("onnxruntime", "m.onnx")):
            run = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    _PROBE,
                    "onnx" if kind == "onnxruntime" else kind,
                    str(out / file),
                    str(out / "x.npy"),
                    str(out / "ref.npy"),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            result[kind] = {
                **json.loads(run.stdout.strip().splitlines()[-1]),
                "file_mb": round((out / file).stat().st_size / 1e6, 1),
            }
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
