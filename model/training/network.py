"""The MobileNetV2 fracture classifier network.

The network takes RGB images with values 0..255 (the output of
:func:`model.imaging.to_network_input`) and rescales them itself, so the saved file
carries its own input normalisation and no caller can get it wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def build_classifier(
    input_size: int = 224,
    weights: str | Path | None = None,
    dropout: float = 0.2,
    alpha: float = 1.0,
) -> Any:
    """Build MobileNetV2 (ImageNet base when ``weights`` is given) with a sigmoid head.

    ``weights`` is a path to Keras' no-top MobileNetV2 weights file, ``"imagenet"`` where
    internet exists, or ``None`` for random initialisation (tests).
    Returns ``(model, base)`` so callers can freeze or unfreeze the base.
    """
    if input_size < 32:
        raise ValueError(f"input_size must be at least 32, got {input_size}")
    import keras

    base = keras.applications.MobileNetV2(
        input_shape=(input_size, input_size, 3),
        include_top=False,
        weights=str(weights) if weights is not None else None,
        alpha=alpha,
    )
    inputs = keras.Input(shape=(input_size, input_size, 3), name="image")
    # keras.applications.mobilenet_v2.preprocess_input: x / 127.5 - 1
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1.0, name="to_unit_range")(inputs)
    x = base(x)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(1, activation="sigmoid", name="fracture_probability")(x)
    model = keras.Model(inputs, outputs, name="mobilenetv2_fracture")
    return model, base
