"""A trained model on disk: ``<dir>/best_model.keras`` plus ``<dir>/model_card.json``.

The card holds what every consumer needs: name, version, a UID that changes with every
retraining (it becomes the Device UID in the SR's Contributing Equipment), the operating
threshold, the input size and the test-time augmentation the threshold was chosen with.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODEL_FILE = "best_model.keras"
CARD_FILE = "model_card.json"
#: ``none``: one forward pass; ``d4``: the mean probability over the image's 8 rotations by
#: 90 degrees and mirror images (the dihedral group D4, the same transforms training used).
TEST_TIME_AUGMENTATIONS = ("none", "d4")


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    uid: str
    threshold: float
    input_size: int
    manufacturer: str = "fracture-triage project"
    test_time_augmentation: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        if self.input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {self.input_size}")
        if not self.uid or not all(part.isdigit() for part in self.uid.split(".")):
            raise ValueError(f"uid must be a DICOM UID, got {self.uid!r}")
        if self.test_time_augmentation not in TEST_TIME_AUGMENTATIONS:
            raise ValueError(
                f"test_time_augmentation must be one of {TEST_TIME_AUGMENTATIONS}, "
                f"got {self.test_time_augmentation!r}"
            )


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CARD_FILE} in model directory {model_dir}")
    data = json.loads(path.read_text())
    known = {k: data[k] for k in ("name", "version", "uid", "threshold", "input_size") if k in data}
    missing = {"name", "version", "uid", "threshold", "input_size"} - known.keys()
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}")
    optional = ("manufacturer", "test_time_augmentation")
    extra = {k: v for k, v in data.items() if k not in known and k not in optional}
    return ModelCard(
        **known,
        **{k: data[k] for k in optional if k in data},
        extra=extra,
    )


def write_card(model_dir: Path, card: ModelCard) -> Path:
    path = Path(model_dir) / CARD_FILE
    data = asdict(card)
    extra = data.pop("extra")
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
