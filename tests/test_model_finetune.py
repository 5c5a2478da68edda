"""End-to-end fine-tuning: augmentation that is fresh, reproducible and keeps the picture, and a
smoke run on a few dozen real images that saves a network the node can load."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from model.artifact import MODEL_FILE, read_card
from tests.conftest import REPO, SHARED, require

#: Left out of the fast tier: TensorFlow graphs and a training run.
pytestmark = pytest.mark.slow

WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet_1.0_224_no_top.h5"


def _picture(side: int) -> np.ndarray:
    img = np.zeros((side, side), np.uint8)
    img[side // 4 : side // 2, side // 8 : side // 2] = 200  # an asymmetric bright block
    return img


def test_augmentation_is_fresh_per_batch_reproducible_and_in_range() -> None:
    import tensorflow as tf

    from model.training.augment import AugmentConfig, augment_batch

    x = tf.constant(np.stack([_picture(80)] * 4))
    cfg = AugmentConfig()
    a = augment_batch(x, 64, tf.constant([1, 0], tf.int64), cfg).numpy()
    b = augment_batch(x, 64, tf.constant([1, 0], tf.int64), cfg).numpy()
    c = augment_batch(x, 64, tf.constant([1, 1], tf.int64), cfg).numpy()
    assert a.shape == (4, 64, 64, 3) and a.min() >= 0 and a.max() <= 255
    np.testing.assert_array_equal(a, b)  # same seed, same views
    assert not np.allclose(a, c)  # the next batch draws new views
    assert not np.allclose(a[0], a[1])  # and each image its own
    # the bright block survives: augmentation moves the picture, it does not erase it
    assert all((v[..., 0] > 100).mean() > 0.03 for v in a)


def test_warp_without_randomness_is_the_plain_resize() -> None:
    import tensorflow as tf

    from model.training.augment import AugmentConfig, warp_batch

    cfg = AugmentConfig(max_degrees=0.0, min_zoom=1.0, aspect_jitter=0.0)
    img = _picture(64).astype(np.float32)[None, ..., None]
    # with no rotation, zoom or shift, any D4 element maps the block to a D4 image of it
    out = warp_batch(tf.constant(img), 64, tf.constant([3, 3], tf.int64), cfg).numpy()[0, ..., 0]
    views = [np.rot90(v, k) for v in (img[0, ..., 0], img[0, ::-1, :, 0].T) for k in range(4)]
    # shift room is 4 % of the side: compare the block's area, not exact pixels
    assert any(abs((out > 100).sum() - (v > 100).sum()) < 0.2 * (v > 100).sum() for v in views)


@pytest.mark.timeout(600)
def test_finetune_smoke_run_saves_a_loadable_network(tmp_path: Path) -> None:
    from model.training import finetune

    out = tmp_path / "artifact"
    args = [
        "--bfmr-dir", str(require(SHARED / "datasets/bone-fracture-multi-region")),
        "--fracatlas-dir", str(require(SHARED / "datasets/fracatlas-train")),
        "--weights", str(require(WEIGHTS)),
        "--split", str(require(REPO / "model/splits/split_v1.csv")),
        "--out", str(out),
        "--size", "96",
        "--limit", "24",
        "--warmup-epochs", "2",
        "--epochs", "1",
        "--batch-size", "8",
        "--version", "smoke",
        "--no-export",
    ]  # fmt: skip
    assert finetune.main(args) == 0
    card = read_card(out)
    training = card.extra["training"]
    assert card.input_size == 96 and training["batch_norm"].startswith("frozen")
    assert training["images"]["train"] == 24 and training["epochs_run"] == 3
    assert (out / "image-cache" / "meta.json").is_file()
    import keras

    model = keras.models.load_model(out / MODEL_FILE)
    base = next(layer for layer in model.layers if layer.name.startswith("mobilenetv2"))
    # batch norm stayed frozen in the saved network, every convolution trained
    assert all(
        not layer.trainable
        for layer in base.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    # a second run reuses the decoded-image cache instead of decoding again
    meta = out / "image-cache" / "meta.json"
    before = meta.stat().st_mtime_ns
    assert finetune.main([*args, "--epochs", "0", "--warmup-epochs", "1"]) == 0
    assert meta.stat().st_mtime_ns == before
