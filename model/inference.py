"""Inference: load a model artifact's LiteRT export once and classify images or files.

This is the one classification path: the worker, ``fracture-triage classify``, evaluation,
the threshold choice and ``model.benchmark`` all call :class:`Classifier`. It needs LiteRT
(``ai-edge-litert``) and numpy, never TensorFlow: the export is made from the Keras network at
ship time by ``model.training.export``, with the card's test-time augmentation built into the
graph (for ``d4``, the 8 rotations / mirror images of the image run as one batch of 8 and
the graph returns their mean probability).

The export also returns the network's class activation map (CAM) beside the probability:
for MobileNetV2 + global average pooling + one sigmoid unit it is exact, the last feature
maps weighted by the dense unit's weights (``model.training.export.cam_parts``), in logit
units, ``(h, w)`` = 1/32 of the input size, in the input image's orientation (for ``d4`` the
mean of the 8 views' maps, each turned back). :meth:`Classifier.predict_with_map` returns
both; an export made before maps has none, and says so (:class:`ExportError`).
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from model.artifact import ExportError, ModelCard, checked_export, read_card

__all__ = [
    "Classifier",
    "Explained",
    "ExportError",
    "ImageError",
    "Prediction",
    "ProbabilityMap",
    "predict_files",
]


class ImageError(ValueError):
    """The input file cannot be read, decoded or turned into the network's input."""


@dataclass(frozen=True)
class Prediction:
    probability: float
    fracture: bool
    preprocess_ms: float
    inference_ms: float


class ProbabilityMap(NamedTuple):
    """The probability of one image and its class activation map ``(h, w)`` float32 (logit
    units: the map's mean is the logit of the single-view network; positive where the image
    speaks for a fracture), in the orientation of the image given."""

    probability: float
    map: np.ndarray


@dataclass(frozen=True)
class Explained:
    """One file classified with its map (the worker's path): the prediction, the file
    rendered as 8-bit gray at its own size (what the map is drawn over) and the map, None
    when the export has none."""

    prediction: Prediction
    gray: np.ndarray
    map: np.ndarray | None


class Classifier:
    """A loaded fracture classifier. Build with :meth:`load`; reuse for every image."""

    def __init__(self, interpreter: Any, card: ModelCard) -> None:
        self._interpreter = interpreter
        self._input = interpreter.get_input_details()[0]["index"]
        self._output, self._map_output = _output_indices(interpreter.get_output_details())
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
        release_file_pages(path)
        shape = tuple(interpreter.get_input_details()[0]["shape"])
        if shape != (1, card.input_size, card.input_size, 3):
            raise ExportError(
                f"{path} has input shape {shape}, expected (1, {card.input_size}, "
                f"{card.input_size}, 3) for the card's input size"
            )
        return cls(interpreter, card)

    @property
    def has_map(self) -> bool:
        """Whether the export returns the class activation map (exports made before maps:
        not)."""
        return self._map_output is not None

    @property
    def threshold(self) -> float:
        return self.card.threshold

    @property
    def input_size(self) -> int:
        return self.card.input_size

    def predict(self, image: np.ndarray) -> float:
        """Fracture probability of one ``(size, size, 3)`` image with values 0..255 (with the
        card's test-time augmentation, which runs inside the export)."""
        with self._lock:
            self._invoke(image)
            return float(self._interpreter.get_tensor(self._output).reshape(-1)[0])

    def predict_with_map(self, image: np.ndarray) -> ProbabilityMap:
        """Probability and class activation map of one ``(size, size, 3)`` image 0..255: the
        probability is exactly :meth:`predict`'s (one invocation gives both).

        Raises :class:`ExportError` when the export has no map output (made before maps
        were exported: export again).
        """
        if self._map_output is None:
            raise ExportError(
                f"the export of {self.card.name} {self.card.version} has no class activation "
                "map output (made before maps were exported); export it again with "
                "python -m model.training.export --model DIR"
            )
        with self._lock:
            self._invoke(image)
            probability = float(self._interpreter.get_tensor(self._output).reshape(-1)[0])
            cam = np.array(self._interpreter.get_tensor(self._map_output)[0], dtype=np.float32)
        return ProbabilityMap(probability, cam)

    def _invoke(self, image: np.ndarray) -> None:
        # the caller holds the lock
        if image.shape != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"expected a ({self.input_size}, {self.input_size}, 3) image, got {image.shape}"
            )
        batch = np.ascontiguousarray(image[np.newaxis], dtype=np.float32)
        self._interpreter.set_tensor(self._input, batch)
        self._interpreter.invoke()

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Fracture probabilities for ``(N, size, size, 3)`` images with values 0..255."""
        if images.ndim != 4:
            raise ValueError(f"expected (N, size, size, 3) images, got {images.shape}")
        return np.array([self.predict(image) for image in images], dtype=np.float64)

    def prepare(self, path: Path, max_pixels: int | None = None) -> np.ndarray:
        """The network input of one DICOM or picture file; :class:`ImageError` with the reason
        when the file cannot be read or decoded (see :meth:`load_gray`)."""
        return self.network_input(self.load_gray(path, max_pixels=max_pixels))

    def network_input(self, gray: np.ndarray) -> np.ndarray:
        """The network input of a rendered 8-bit gray image (:meth:`load_gray`)."""
        from model.imaging import to_network_input

        try:
            return to_network_input(gray, self.input_size)
        except (TypeError, ValueError) as exc:
            raise ImageError(f"cannot resize the image to the network's input: {exc}") from exc

    def load_gray(self, path: Path, max_pixels: int | None = None) -> np.ndarray:
        """One DICOM or picture file rendered as 8-bit gray ``(H, W)``, bone bright, by the
        project's one rendering path (:func:`model.imaging.load_gray_uint8`);
        :class:`ImageError` with the reason when the file cannot be read or decoded.

        Every failure that is about the file becomes an :class:`ImageError`, so a caller
        (the worker) records it at once instead of retrying: a third-party decoder's own
        exceptions, a Rust decoder's panic (``pyo3_runtime.PanicException``, a
        ``BaseException`` that ``except Exception`` misses; in the worker it escaped the
        task, could not even be pickled back to Celery and the instance was retried until
        "gave up after 5 attempts"), and a MemoryError (an allocation the decoder sized
        from the file). KeyboardInterrupt, SystemExit and the like still propagate.
        """
        from model.imaging import PreprocessError, load_gray_uint8
        from model.imaging.errors import is_decoder_panic

        name = Path(path).name
        try:
            return load_gray_uint8(Path(path), max_pixels=max_pixels)
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

    def explain_file(self, path: Path, max_pixels: int | None = None) -> Explained:
        """Classify one file and return its map with the rendered image (the worker's path):
        the probability is :meth:`classify_file`'s. ``map`` is None when the export has
        none; ``inference_ms`` covers the one invocation that gives both."""
        t0 = time.perf_counter()
        gray = self.load_gray(path, max_pixels=max_pixels)
        image = self.network_input(gray)
        t1 = time.perf_counter()
        cam: np.ndarray | None
        if self.has_map:
            probability, cam = self.predict_with_map(image)
        else:
            probability, cam = self.predict(image), None
        t2 = time.perf_counter()
        prediction = Prediction(
            probability=probability,
            fracture=probability >= self.threshold,
            preprocess_ms=(t1 - t0) * 1000,
            inference_ms=(t2 - t1) * 1000,
        )
        return Explained(prediction=prediction, gray=gray, map=cam)


#: madvise(2) advice: drop the pages; a private file mapping reads them from the file again
#: when next touched.
_MADV_DONTNEED = 4


def release_file_pages(path: Path) -> int:
    """Drop this process's resident pages of the memory-mapped file ``path``; return the
    bytes of mapping advised (0 where there is none, or not on Linux with glibc).

    LiteRT maps the export and its XNNPACK delegate copies the weights into its own packed
    layout when the tensors are allocated; the file's pages it read (8.5 MB of the shipped
    export) then stay resident though nothing reads them again, in every worker. Dropping
    them is what the kernel itself does to clean file pages under memory pressure, so nothing
    can change: a page touched again (a constant of an operator XNNPACK does not run) is read
    from the file, which :func:`checked_export` verified.
    """
    try:
        maps = Path("/proc/self/maps").read_text()
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return 0
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    target = os.path.realpath(path)
    advised = 0
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == target:
            start, end = (int(v, 16) for v in fields[0].split("-"))
            if libc.madvise(start, end - start, _MADV_DONTNEED) == 0:
                advised += end - start
    return advised


def _output_indices(details: Sequence[dict[str, Any]]) -> tuple[int, int | None]:
    """The tensor indices of the probability (1 value) and of the map (a 3-D ``(1, h, w)``
    tensor, absent from exports made before maps). Told apart by shape: the converter names
    a dict's outputs in no documented order."""
    probability = [d["index"] for d in details if tuple(d["shape"]) == (1,)]
    maps = [d["index"] for d in details if len(d["shape"]) == 3]
    if len(probability) != 1 or len(maps) > 1 or len(details) != 1 + len(maps):
        shapes = [tuple(int(n) for n in d["shape"]) for d in details]
        raise ExportError(f"export outputs {shapes}: expected a probability and at most a map")
    return probability[0], (maps[0] if maps else None)


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
