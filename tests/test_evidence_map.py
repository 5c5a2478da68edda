"""The class activation map the export returns beside the probability: it follows the image
(mirrored and rotated with it), it depends on what the network learned (randomised weights
give other maps: the model-parameter randomisation test of Adebayo et al., 2018, "Sanity
checks for saliency maps"), the probability is the one ``predict`` gives, and an export made
without maps says so."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from model.artifact import EXPORT_FILE, MODEL_FILE, file_sha256, read_card, resolve_model_dir
from model.artifact import write_card as write_model_card
from model.imaging.overlay import refusal
from model.inference import Classifier, ExportError
from tests.conftest import SHARED, require

FRACATLAS_IMAGES = SHARED / "datasets/fracatlas-train/images"


def _images(n: int) -> list[Path]:
    files = sorted(require(FRACATLAS_IMAGES).glob("*.jpg"))
    return files[:: max(1, len(files) // n)][:n]


@pytest.fixture(scope="module")
def shipped() -> Classifier:
    return Classifier.load(resolve_model_dir(None))


def test_the_shipped_export_returns_a_map_with_the_same_probability(shipped: Classifier) -> None:
    assert shipped.has_map
    image = shipped.prepare(_images(1)[0])
    probability, cam = shipped.predict_with_map(image)
    assert probability == shipped.predict(image)  # one graph, one answer
    side = shipped.input_size // 32
    assert cam.shape == (side, side) and cam.dtype == np.float32
    assert np.isfinite(cam).all() and float(cam.max() - cam.min()) > 0.1


def test_the_map_mirrors_and_turns_with_the_image(shipped: Classifier) -> None:
    """Each of the 8 views' maps is turned back before averaging, so the map of a mirrored
    (or rotated) radiograph is the mirrored (rotated) map: a structure lights up where it is
    in the image shown. Without the turning back, the mirrored image's map would equal the
    original's, which these maps (not symmetric) tell apart."""
    for path in _images(3):
        image = shipped.prepare(path)
        _, cam = shipped.predict_with_map(image)
        assert np.abs(cam - cam[:, ::-1]).max() > 0.1  # not symmetric: the test can fail
        _, mirrored = shipped.predict_with_map(np.ascontiguousarray(image[:, ::-1]))
        np.testing.assert_allclose(mirrored, cam[:, ::-1], atol=1e-3)
        _, turned = shipped.predict_with_map(np.ascontiguousarray(np.rot90(image)))
        np.testing.assert_allclose(turned, np.rot90(cam), atol=1e-3)


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a.ravel())).astype(float)
    rb = np.argsort(np.argsort(b.ravel())).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


@pytest.mark.slow  # builds and exports a Keras network (TensorFlow)
def test_maps_change_when_the_weights_are_randomised(shipped: Classifier, tmp_path: Path) -> None:
    """Adebayo et al. (2018), model-parameter randomisation: a saliency method whose maps
    survive randomising the network shows the image, not what the network learned. The
    shipped network with every weight re-initialised (same architecture, same export) gives
    maps whose ranking of the image's regions is unrelated to the trained network's."""
    import keras

    from model.training.export import export

    source = resolve_model_dir(None)
    random_dir = tmp_path / "randomised"
    random_dir.mkdir()
    shutil.copy(source / "model_card.json", random_dir / "model_card.json")
    keras.utils.set_random_seed(7)
    trained = keras.models.load_model(source / MODEL_FILE, compile=False)
    randomised = keras.models.clone_model(trained)  # fresh initialisers, no trained weight
    randomised.save(random_dir / MODEL_FILE)
    export(random_dir)
    other = Classifier.load(random_dir)

    correlations, same_image = [], []
    images = [shipped.prepare(p) for p in _images(6)]
    for image in images:
        _, cam = shipped.predict_with_map(image)
        _, random_cam = other.predict_with_map(image)
        correlations.append(_rank_correlation(cam, random_cam))
    # The trained maps themselves differ from image to image (they are not a fixed pattern).
    trained_maps = [shipped.predict_with_map(i).map for i in images]
    for a, b in zip(trained_maps, trained_maps[1:], strict=False):
        same_image.append(_rank_correlation(a, b))
    print("rank correlation trained vs randomised:", np.round(correlations, 2))
    print("rank correlation between images (trained):", np.round(same_image, 2))
    assert np.median(np.abs(correlations)) < 0.5
    assert np.median(same_image) < 0.9


@pytest.mark.slow  # converts a network with TensorFlow
def test_an_export_without_a_map_says_so(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An export made before maps (probability only) still classifies; asking it for a map
    is a clear ExportError, and the evidence is "not produced" with that reason."""
    import keras
    import tensorflow as tf

    model_dir = tmp_path / "old"
    shutil.copytree(tiny_model_dir, model_dir)
    card = read_card(model_dir)
    model = keras.models.load_model(model_dir / MODEL_FILE, compile=False)
    size = card.input_size

    @tf.function(input_signature=[tf.TensorSpec((1, size, size, 3), tf.float32)])
    def forward(x: tf.Tensor) -> tf.Tensor:
        return tf.reshape(model(x, training=False), (-1,))

    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [forward.get_concrete_function()], forward
    )
    (model_dir / EXPORT_FILE).write_bytes(converter.convert())
    assert card.export is not None
    info = dataclasses.replace(
        card.export, sha256=file_sha256(model_dir / EXPORT_FILE), class_activation_map=False
    )
    write_model_card(model_dir, dataclasses.replace(card, export=info))

    old = Classifier.load(model_dir)
    assert not old.has_map
    path = _images(1)[0]
    image = old.prepare(path)
    assert 0.0 <= old.predict(image) <= 1.0
    with pytest.raises(ExportError, match="no class activation map output"):
        old.predict_with_map(image)
    explained = old.explain_file(path)
    assert explained.map is None
    assert explained.prediction.probability == old.predict(image)
    assert refusal(explained.gray, explained.map) == (
        "the model's export returns no class activation map"
    )


def test_images_no_map_can_be_shown_on_are_refused_with_the_reason() -> None:
    rng = np.random.default_rng(0)
    cam = rng.normal(size=(7, 7)).astype(np.float32)
    photo = rng.integers(0, 256, size=(300, 200), dtype=np.uint8)
    assert refusal(photo, cam) is None
    assert "16x16 pixels, smaller than 32 px" in (refusal(photo[:16, :16], cam) or "")
    assert "uniform (every pixel 7)" in (refusal(np.full((300, 200), 7, np.uint8), cam) or "")
    assert "flat" in (refusal(photo, np.zeros((7, 7), np.float32)) or "")
    assert "not a finite" in (refusal(photo, np.full((7, 7), np.nan, np.float32)) or "")
