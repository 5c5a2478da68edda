"""A trained model on disk: ``<dir>/best_model.keras`` plus ``<dir>/model_card.json``.

The card holds what every consumer needs: name, version, a UID that changes with every
retraining (it becomes the Device UID in the SR's Contributing Equipment), the operating
threshold and the input size.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MODEL_FILE = "best_model.keras"
CARD_FILE = "model_card.json"


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    uid: str
    threshold: float
    input_size: int
    manufacturer: str = "fracture-triage project"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1], got {self.threshold}")
        if self.input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {self.input_size}")
        if not self.uid or not all(part.isdigit() for part in self.uid.split(".")):
            raise ValueError(f"uid must be a DICOM UID, got {self.uid!r}")


def read_card(model_dir: Path) -> ModelCard:
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CARD_FILE} in model directory {model_dir}")
    data = json.loads(path.read_text())
    known = {k: data[k] for k in ("name", "version", "uid", "threshold", "input_size") if k in data}
    missing = {"name", "version", "uid", "threshold", "input_size"} - known.keys()
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}")
    extra = {k: v for k, v in data.items() if k not in known and k != "manufacturer"}
    return ModelCard(
        manufacturer=data.get("manufacturer", "fracture-triage project"), extra=extra, **known
    )


def write_card(model_dir: Path, card: ModelCard) -> Path:
    path = Path(model_dir) / CARD_FILE
    data = asdict(card)
    extra = data.pop("extra")
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path
