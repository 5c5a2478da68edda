"""Inference: load a model artifact's LiteRT export once and classify images or files.

This is the one classification path: the worker, ``fracture-triage classify``, evaluation,
the threshold choice and ``model.benchmark`` all call :class:`Classifier`. It needs LiteRT
(``ai-edge-litert``) and numpy, never TensorFlow: the export is made from the Keras network at
ship time by ``model.training.export``, with the card's test-time augmentation built into the
graph (for ``d4``, the 8 rotations / mirror images of the image run as one batch of 8 and
the graph returns their mean probability).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.artifact import ExportError, ModelCard, checked_export, read_card

__all__ = ["Classifier", "ExportError", "ImageError", "Prediction", "predict_files"]


class ImageError(ValueError):
    """The input file cannot be read, decoded or turned into the network's input."""


@dataclass(frozen=True)
class Prediction:
    probability: float
    fracture: bool
    preprocess_ms: float
    inference_ms: float


class Classifier:
    """A loaded fracture classifier. Build with :meth:`load`; reuse for every image."""

    def __init__(self, interpreter: Any, card: ModelCard) -> None:
        self._interpreter = interpreter
        self._input = interpreter.get_input_details()[0]["index"]
        self._output = interpreter.get_output_details()[0]["index"]
        # one interpreter holds one set of tensors: calls from several threads take turns
        self._lock = threading.Lock()
        self.card = card

    @classmethod
    def load(cls, model_dir: Path, num_threads: int | None = None) -> Classifier:
        """Load ``model_dir``'s export after checking it against the card.

        ``num_threads``: CPU threads for one inference; ``None``: every core this process
        may use (LiteRT's own default is one thread, measured 50 ms against 28 ms with two
        for the shipped D4 network on 2 cores).
        Raises :class:`ExportError` naming the file when the card has no export record, the
        file is missing or its digest differs (corrupt or replaced), LiteRT cannot load it, or
        its input size or test-time augmentation is not the card's.
        """
        model_dir = Path(model_dir)
        card = read_card(model_dir)
        path = checked_export(model_dir, card)
        from ai_edge_litert.interpreter import Interpreter

        try:
            threads = num_threads or len(os.sched_getaffinity(0))
            interpreter = Interpreter(model_path=str(path), num_threads=threads)
            interpreter.allocate_tensors()
        except (RuntimeError, ValueError) as exc:
            raise ExportError(f"LiteRT cannot load {path}: {exc}") from exc
        shape = tuple(interpreter.get_input_details()[0]["shape"])
        if shape != (1, card.input_size, card.input_size, 3):
            raise ExportError(
                f"{path} has input shape {shape}, expected (1, {card.input_size}, "
                f"{card.input_size}, 3) for the card's input size"
            )
        return cls(interpreter, card)

    @property
    def threshold(self) -> float:
        return self.card.threshold

    @property
    def input_size(self) -> int:
        return self.card.input_size

    def predict(self, image: np.ndarray) -> float:
        """Fracture probability of one ``(size, size, 3)`` image with values 0..255 (with the
        card's test-time augmentation, which runs inside the export)."""
        if image.shape != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"expected a ({self.input_size}, {self.input_size}, 3) image, got {image.shape}"
            )
        batch = np.ascontiguousarray(image[np.newaxis], dtype=np.float32)
        with self._lock:
            self._interpreter.set_tensor(self._input, batch)
            self._interpreter.invoke()
            return float(self._interpreter.get_tensor(self._output).reshape(-1)[0])

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Fracture probabilities for ``(N, size, size, 3)`` images with values 0..255."""
        if images.ndim != 4:
            raise ValueError(f"expected (N, size, size, 3) images, got {images.shape}")
        return np.array([self.predict(image) for image in images], dtype=np.float64)

    def prepare(self, path: Path, max_pixels: int | None = None) -> np.ndarray:
        """The network input of one DICOM or picture file; :class:`ImageError` with the reason
        when the file cannot be read or decoded.

        Every failure that is about the file becomes an :class:`ImageError`, so a caller
        (the worker) records it at once instead of retrying: a third-party decoder's own
        exceptions, a Rust decoder's panic (``pyo3_runtime.PanicException``, a
        ``BaseException`` that ``except Exception`` misses; in the worker it escaped the
        task, could not even be pickled back to Celery and the instance was retried until
        "gave up after 5 attempts"), and a MemoryError (an allocation the decoder sized
        from the file). KeyboardInterrupt, SystemExit and the like still propagate.
        """
        from model.imaging import PreprocessError, load_network_input
        from model.imaging.errors import is_decoder_panic

        name = Path(path).name
        try:
            return load_network_input(Path(path), self.input_size, max_pixels=max_pixels)
        except PreprocessError as exc:
            raise ImageError(str(exc)) from exc
        except OSError as exc:
            raise ImageError(f"unreadable file {name}: {exc}") from exc
        except MemoryError as exc:
            # The header passed the max_pixels check, yet decoding it did not fit in memory:
            # a clear failure of this file rather than a dead worker or an empty reason.
            raise ImageError(
                f"out of memory while decoding or preprocessing {name} (MemoryError); "
                "lower FRACTURE_TRIAGE_MAX_PIXELS or give the worker more memory"
            ) from exc
        except Exception as exc:
            raise ImageError(f"{type(exc).__name__}: {exc}") from exc
        except BaseException as exc:
            if not is_decoder_panic(exc):
                raise
            reason = " ".join(str(exc).split())[:300]
            raise ImageError(
                f"a decoder crashed on corrupt data in {name} (PanicException: {reason})"
            ) from exc

    def classify_file(self, path: Path, max_pixels: int | None = None) -> Prediction:
        """Preprocess one DICOM or picture file and classify it (the worker's path)."""
        t0 = time.perf_counter()
        image = self.prepare(path, max_pixels=max_pixels)
        t1 = time.perf_counter()
        probability = self.predict(image)
        t2 = time.perf_counter()
        return Prediction(
            probability=probability,
            fracture=probability >= self.threshold,
            preprocess_ms=(t1 - t0) * 1000,
            inference_ms=(t2 - t1) * 1000,
        )


def predict_files(
    classifier: Classifier, paths: Sequence[Path], workers: int = 2
) -> Iterator[tuple[Path, float | str]]:
    """Probabilities in input order; a failing file yields its error message instead.

    Decoding runs in a small thread pool (Pillow's and pydicom's decoders release the GIL)
    while the network classifies the file before.
    """

    def load(path: Path) -> np.ndarray | str:
        try:
            return classifier.prepare(path)
        except ImageError as exc:
            return str(exc)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        for path, item in zip(paths, pool.map(load, paths), strict=True):
            yield path, (item if isinstance(item, str) else classifier.predict(item))
