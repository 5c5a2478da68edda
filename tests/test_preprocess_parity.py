"""Same answer from DICOM and from the picture (issue 3).

Real training pictures from ../shared/datasets are stored as DICOM the ways a PACS or a
converter might store them -- MONOCHROME1 and MONOCHROME2; 8, 12 and 16 bits stored with the
values scaled; with a window, several windows, a rescale, a VOI LUT Sequence or no VOI at all;
native and JPEG-LS / JPEG 2000 / RLE lossless; RGB -- and each DICOM must give the picture's
8-bit pixels and, through the real model code path, the picture's probability within 0.01.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from model.imaging import (
    image_to_uint8,
    load_gray_uint8,
    load_network_input,
    to_network_input,
)
from model.inference import Classifier
from tests.conftest import SHARED, require

#: Left out of the fast tier: builds the ImageNet-based network (TensorFlow).
pytestmark = pytest.mark.slow

# Real pictures of the training data: grayscale PNG, RGB JPEG, grayscale JPEG, FracAtlas.
PICTURES = [
    "datasets/bone-fracture-multi-region/images/"
    "05db98d6764f3f98897d38e08fe17cf908e6083c92874e7377678d7dcf8a809b.png",
    "datasets/bone-fracture-multi-region/images/"
    "016986acd4e8b9a20634059aa3e0cdac9e5c520d84da92ffe5165dadb38d0206.jpg",
    "datasets/bone-fracture-multi-region/images/"
    "0b81fed589383f9a3df51de396d765e93b02104129e198a2d92a82b7fb0b20f2.jpg",
    "datasets/fracatlas-train/images/IMG0000011.jpg",
]


@dataclass(frozen=True)
class Variant:
    """How to store an 8-bit gray picture ``v`` as DICOM."""

    bits: int = 8
    mono1: bool = False
    voi: str = "none"  # none | window | windows | rescale+window | lut | lut+window
    syntax: UID = ExplicitVRLittleEndian
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        mono = "MONO1" if self.mono1 else "MONO2"
        return f"{mono}-{self.bits}b-{self.voi}-{self.syntax.keyword}"


VARIANTS = [
    Variant(8),
    Variant(8, mono1=True),
    Variant(8, syntax=ImplicitVRLittleEndian),
    Variant(12),
    Variant(16, mono1=True),
    Variant(12, voi="window"),
    Variant(12, mono1=True, voi="window"),
    Variant(16, voi="windows"),
    Variant(16, mono1=True, voi="rescale+window"),
    Variant(12, voi="lut"),
    Variant(12, mono1=True, voi="lut+window"),
    Variant(12, mono1=True, voi="window", syntax=JPEGLSLossless),
    Variant(16, syntax=JPEG2000Lossless),
    Variant(12, voi="window", syntax=JPEG2000Lossless),
    Variant(12, voi="window", syntax=RLELossless),
    Variant(8, mono1=True, syntax=RLELossless),
]


def linear_window(lo: float, hi: float) -> tuple[float, float]:
    """Center/width of the PS3.3 C.11.2.1.2.1 LINEAR window mapping ``lo`` to 0, ``hi`` to 1."""
    width = hi - lo + 1.0
    return lo + (width - 1.0) / 2.0 + 0.5, width


def build_dicom(v: np.ndarray, variant: Variant) -> Dataset:
    """A Secondary Capture of the gray picture ``v`` (uint8) stored as ``variant`` says."""
    top = (1 << variant.bits) - 1
    stored = np.rint(v.astype(np.float64) * top / 255.0)
    if variant.mono1:
        stored = top - stored  # MONOCHROME1: the minimum value is white
    allocated = 8 if variant.bits <= 8 else 16
    stored_arr = stored.astype(np.uint8 if allocated == 8 else np.uint16)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = (
        ExplicitVRLittleEndian if variant.syntax.is_encapsulated else variant.syntax
    )
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.Rows, ds.Columns = v.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if variant.mono1 else "MONOCHROME2"
    ds.BitsAllocated = allocated
    ds.BitsStored = variant.bits
    ds.HighBit = variant.bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = stored_arr.tobytes()

    if variant.voi in ("window", "lut+window"):
        ds.WindowCenter, ds.WindowWidth = linear_window(0, top)
    if variant.voi == "lut+window":
        # A narrow window that would look very different: the VOI LUT must win.
        ds.WindowCenter, ds.WindowWidth = top / 4, top / 8
    if variant.voi == "windows":
        # Several windows: the first is the one to use (PS3.3 C.11.2.1.2).
        c, w = linear_window(0, top)
        ds.WindowCenter, ds.WindowWidth = [c, top / 4], [w, top / 8]
    if variant.voi == "rescale+window":
        slope, intercept = 0.25, -1024.0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept, "US"
        # The window is in the rescaled (Modality LUT output) space.
        ds.WindowCenter, ds.WindowWidth = linear_window(intercept, top * slope + intercept)
    if variant.voi.startswith("lut"):
        item = Dataset()
        item.LUTDescriptor = [top + 1, 0, 16]
        table = np.rint(np.arange(top + 1) * 65535.0 / top).astype(np.uint16)
        # LUT Data may be OW or US (PS3.3 C.11.2.1.1; IHE requires both be read): one each.
        if variant.voi == "lut":
            item.add_new(0x00283006, "OW", table.astype("<u2").tobytes())
        else:
            item.add_new(0x00283006, "US", table.tolist())
        item.LUTExplanation = "linear"
        ds.VOILUTSequence = [item]

    if variant.syntax.is_encapsulated:
        ds.compress(variant.syntax, stored_arr, generate_instance_uid=False)
    return ds


def build_rgb_dicom(rgb: np.ndarray) -> Dataset:
    ds = build_dicom(rgb[:, :, 0], Variant(8))
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.PixelData = np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()
    return ds


WEIGHTS = "weights/mobilenet_v2_imagenet_1.0_224_no_top.h5"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Classifier:
    """The project's network with the shared ImageNet base and a seeded random head, saved
    as an artifact and loaded through :meth:`Classifier.load` (the worker's code path).

    Not conftest's ``tiny_model_dir``: its random base lets the features vanish (~1e-10
    after global pooling), so it answers 0.5 for every input and a 0.01 tolerance on it
    would test nothing. ImageNet features make the probability depend on the picture.
    """
    import keras

    from model.artifact import MODEL_FILE, ModelCard, write_card
    from model.training.network import build_classifier

    keras.utils.set_random_seed(0)
    out = tmp_path_factory.mktemp("parity-model")
    model, _ = build_classifier(input_size=96, weights=require(SHARED / WEIGHTS))
    model.save(out / MODEL_FILE)
    card = ModelCard(
        name="parity-mobilenetv2",
        version="test-imagenet",
        uid="2.25.42",
        threshold=0.5,
        input_size=96,
    )
    write_card(out, card)
    from model.training.export import export

    export(out)
    return Classifier.load(out)


@pytest.mark.parametrize("picture", PICTURES, ids=lambda p: Path(p).name[:12])
def test_dicom_gives_the_pictures_pixels_and_probability(
    picture: str, classifier: Classifier, tmp_path: Path
) -> None:
    path = require(SHARED / picture)
    v = image_to_uint8(path)
    assert v.max() >= 128, "precondition of the 12/16-bit no-VOI cases (see preprocess)"
    size = classifier.input_size

    builders: dict[str, Callable[[], Dataset]] = {
        variant.name: partial(build_dicom, v, variant) for variant in VARIANTS
    }
    with Image.open(path) as im:
        if im.mode == "RGB":
            rgb = np.asarray(im)
            builders["RGB-8b"] = partial(build_rgb_dicom, rgb)

    names = list(builders)
    files = []
    for i, name in enumerate(names):
        ds = builders[name]()
        target = tmp_path / f"{i:02d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        files.append(target)

    failures = []
    for name, target in zip(names, files, strict=True):
        gray = load_gray_uint8(target)
        diff = np.abs(gray.astype(np.int16) - v)
        if diff.mean() > 0.05 or diff.max() > 1:
            failures.append(f"{name}: mean abs diff {diff.mean():.3f}, max {diff.max()}")
    assert not failures, "\n".join(failures)

    # Negative control first: the model must notice a change as large as a wrong polarity,
    # or agreeing within 0.01 would mean nothing.
    batch = np.stack(
        [load_network_input(path, size), to_network_input(255 - v, size)]
        + [load_network_input(f, size) for f in files]
    )
    probabilities = classifier.predict_batch(batch)
    assert abs(probabilities[1] - probabilities[0]) > 0.01, probabilities[:2]
    worst = np.abs(probabilities[2:] - probabilities[0])
    assert worst.max() < 0.01, dict(zip(names, worst.round(4).tolist(), strict=True))
