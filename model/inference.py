"""Inference: load a model artifact once and classify preprocessed images or files."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.artifact import MODEL_FILE, ModelCard, read_card
from model.imaging import load_network_input


@dataclass(frozen=True)
class Prediction:
    probability: float
    fracture: bool
    preprocess_ms: float
    inference_ms: float


class Classifier:
    """A loaded fracture classifier. Build with :meth:`load`; reuse for every image."""

    def __init__(self, keras_model: Any, card: ModelCard) -> None:
        self._model = keras_model
        self.card = card
        self._forward: Any = None

    def _compiled(self) -> Any:
        """The forward pass as one traced graph (built on first use, in the process that uses
        it): calling a Keras model eagerly dispatches ~150 layers one by one, several times
        slower per image on a CPU."""
        if self._forward is None:
            import tensorflow as tf

            size = self.input_size
            spec = tf.TensorSpec((None, size, size, 3), tf.float32)
            model = self._model
            if self.card.test_time_augmentation == "d4":

                def forward(x: Any) -> Any:
                    # the 8 rotations / mirror images of every image in one batch, then the
                    # mean probability per image
                    mirrored = tf.reverse(x, [2])
                    views = [tf.image.rot90(v, k) for v in (x, mirrored) for k in range(4)]
                    p = model(tf.concat(views, 0), training=False)
                    return tf.reduce_mean(tf.reshape(p, (8, -1)), axis=0)

            else:

                def forward(x: Any) -> Any:
                    return model(x, training=False)

            self._forward = tf.function(forward, input_signature=[spec])
        return self._forward

    @classmethod
    def load(cls, model_dir: Path) -> Classifier:
        model_dir = Path(model_dir)
        card = read_card(model_dir)
        model_file = model_dir / MODEL_FILE
        if not model_file.is_file():
            raise FileNotFoundError(f"no {MODEL_FILE} in model directory {model_dir}")
        import keras

        return cls(keras.models.load_model(model_file, compile=False), card)

    @property
    def threshold(self) -> float:
        return self.card.threshold

    @property
    def input_size(self) -> int:
        return self.card.input_size

    def predict_batch(self, images: np.ndarray) -> np.ndarray:
        """Fracture probabilities for ``(N, size, size, 3)`` images with values 0..255."""
        if images.ndim != 4 or images.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(
                f"expected (N, {self.input_size}, {self.input_size}, 3) images, got {images.shape}"
            )
        out = self._compiled()(images.astype(np.float32))
        return np.asarray(out, dtype=np.float64).reshape(-1)

    def classify_file(self, path: Path, max_pixels: int | None = None) -> Prediction:
        """Preprocess one DICOM or picture file and classify it."""
        t0 = time.perf_counter()
        image = load_network_input(Path(path), self.input_size, max_pixels=max_pixels)
        t1 = time.perf_counter()
        probability = float(self.predict_batch(image[np.newaxis])[0])
        t2 = time.perf_counter()
        return Prediction(
            probability=probability,
            fracture=probability >= self.threshold,
            preprocess_ms=(t1 - t0) * 1000,
            inference_ms=(t2 - t1) * 1000,
        )
