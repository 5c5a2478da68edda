"""A trained model on disk: a folder with ``model_card.json``, the inference export
``model.tflite`` (all the node loads) and ``best_model.keras`` (training's output, kept for
training and as the reference the export is checked against).

The card holds what every consumer needs: name, version, a UID that changes with every
retraining (it becomes the Device UID in the SR's Contributing Equipment), the operating
thresholds (``threshold``, the lower one, and the optional ``upper_threshold``, from which
``fracture_triage.verdict`` makes the three decision levels), the input size and the
test-time augmentation the thresholds were chosen with, and the export's own record
(:class:`ExportInfo`), so that a card and an export that do not belong together are refused
at load instead of giving silently wrong probabilities.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

MODEL_FILE = "best_model.keras"
CARD_FILE = "model_card.json"
EXPORT_FILE = "model.tflite"
#: ``none``: one forward pass; ``d4``: the mean probability over the image's 8 rotations by
#: 90 degrees and mirror images (the dihedral group D4, the same transforms training used).
TEST_TIME_AUGMENTATIONS = ("none", "d4")
_REQUIRED = ("name", "version", "uid", "threshold", "input_size")
_OPTIONAL = ("manufacturer", "test_time_augmentation", "upper_threshold")


@dataclass(frozen=True)
class ExportInfo:
    """What ``model.training.export`` wrote: the file, its digest and the graph it holds.

    ``input_size`` and ``test_time_augmentation`` describe the exported graph itself (its
    input tensor, and whether the 8 D4 views are built inside it); the loader checks them
    against the card's own fields and the digest against the file.
    """

    file: str
    sha256: str
    input_size: int
    test_time_augmentation: str
    format: str = "litert"
    #: largest |export - Keras| probability over the files it was checked on (None: unchecked)
    max_abs_difference: float | None = None
    checked_files: int = 0
    #: whether the graph also returns the class activation map (exports before it: False)
    class_activation_map: bool = False
    #: largest |export - Keras| map value over the checked files (logit units)
    max_abs_map_difference: float | None = None


@dataclass(frozen=True)
class ModelCard:
    """``threshold`` is the lower operating threshold (at and above it an image is flagged:
    doubt or fracture); ``upper_threshold`` (>= ``threshold``) starts the fracture level. A
    card without it (1.1.0 and older) has no doubt level: upper == lower."""

    name: str
    version: str
    uid: str
    threshold: float
    input_size: int
    manufacturer: str = "fracture-triage project"
    test_time_augmentation: str = "none"
    upper_threshold: float | None = None
    export: ExportInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # The decision rule itself is fracture_triage.verdict's (the model runtime imports
        # nothing of the node); the card only guarantees thresholds it can be applied with.
        for name in ("threshold", "upper_threshold"):
            value = getattr(self, name)
            if value is None and name == "upper_threshold":
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not 0.0 <= value <= 1.0:  # also refuses NaN
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        if self.upper_threshold is not None and self.upper_threshold < self.threshold:
            raise ValueError(
                f"upper_threshold ({self.upper_threshold}) must be >= threshold "
                f"({self.threshold}): the lower threshold starts the doubt level, the upper "
                "one the fracture level"
            )
        if self.input_size < 32:
            raise ValueError(f"input_size must be at least 32, got {self.input_size}")
        if not self.uid or not all(part.isdigit() for part in self.uid.split(".")):
            raise ValueError(f"uid must be a DICOM UID, got {self.uid!r}")
        if self.test_time_augmentation not in TEST_TIME_AUGMENTATIONS:
            raise ValueError(
                f"test_time_augmentation must be one of {TEST_TIME_AUGMENTATIONS}, "
                f"got {self.test_time_augmentation!r}"
            )

    @property
    def upper(self) -> float:
        """The upper threshold in use: ``upper_threshold``, else ``threshold``."""
        return self.threshold if self.upper_threshold is None else self.upper_threshold


def read_card(model_dir: Path) -> ModelCard:
    """The card of ``model_dir``; a missing file or field is a ``FileNotFoundError`` or
    ``ValueError`` naming the file."""
    path = Path(model_dir) / CARD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {CARD_FILE} in model directory {model_dir}")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    known = {k: data[k] for k in _REQUIRED if k in data}
    missing = set(_REQUIRED) - known.keys()
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}")
    export = None
    if data.get("export") is not None:
        try:
            export = ExportInfo(**data["export"])
        except TypeError as exc:
            raise ValueError(f"{path}: malformed 'export' section: {exc}") from exc
    extra = {k: v for k, v in data.items() if k not in (*_REQUIRED, *_OPTIONAL, "export")}
    try:
        return ModelCard(
            **known,
            **{k: data[k] for k in _OPTIONAL if k in data and data[k] is not None},
            export=export,
            extra=extra,
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


def write_card(model_dir: Path, card: ModelCard) -> Path:
    path = Path(model_dir) / CARD_FILE
    data = asdict(card)
    extra = data.pop("extra")
    if data["export"] is None:
        data.pop("export")
    if data["upper_threshold"] is None:  # a card with one threshold stays as it was
        data.pop("upper_threshold")
    data.update(extra)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


class ExportError(RuntimeError):
    """The artifact's export cannot be used: missing, corrupt, or not the card's network.

    The message names the file; an instance being classified is not at fault.
    """


def checked_export(model_dir: Path, card: ModelCard) -> Path:
    """The export file of ``model_dir`` after checking it against ``card`` (no runtime
    needed: what ``up`` checks before starting the roles, and the loader before loading).

    Raises :class:`ExportError` naming the file when the card has no export record, the file
    is missing or its digest differs (corrupt or replaced), or the export's input size or
    test-time augmentation is not the card's.
    """
    info = card.export
    if info is None:
        raise ExportError(
            f"{Path(model_dir) / CARD_FILE} records no inference export; make one with "
            f"python -m model.training.export --model {model_dir}"
        )
    path = Path(model_dir) / info.file
    if not path.is_file():
        raise ExportError(f"no export file {path} (the card names {info.file})")
    if file_sha256(path) != info.sha256:
        raise ExportError(f"{path} does not match the sha256 its card records: corrupt or replaced")
    if info.input_size != card.input_size:
        raise ExportError(
            f"{path} takes {info.input_size} px images but the card says {card.input_size}"
        )
    if info.test_time_augmentation != card.test_time_augmentation:
        raise ExportError(
            f"{path} was exported with test-time augmentation {info.test_time_augmentation!r} "
            f"but the card says {card.test_time_augmentation!r}; export again"
        )
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def shipped_model_dir() -> Path | None:
    """The newest artifact the package ships (``model/artifacts/<version>/``), found as
    package data so that a wheel or a non-editable install carries it too; ``None`` if the
    package ships none."""
    root = resources.files("model") / "artifacts"
    if not root.is_dir():
        return None
    dirs = [Path(str(p)) for p in root.iterdir() if p.is_dir() and (p / CARD_FILE).is_file()]
    return max(dirs, key=lambda p: _version_key(p.name), default=None)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else -1 for part in name.split("."))


def resolve_model_dir(configured: Path | None) -> Path:
    """The model folder a role uses: the configured one, else the shipped one.

    Raises ``FileNotFoundError`` with a message that says what to set when there is neither.
    """
    if configured is not None:
        return Path(configured)
    shipped = shipped_model_dir()
    if shipped is None:
        raise FileNotFoundError(
            "no model: the package ships none; set FRACTURE_TRIAGE_MODEL_DIR or pass --model DIR"
        )
    return shipped
