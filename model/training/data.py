"""The two shared data sets, read from their manifests, and image cleaning.

Data directories are always parameters (``../shared/datasets/...`` beside the repository by
default in the command line, never baked in here). Each distinct image becomes one
:class:`Record`; the bone fracture set lists the same file several times (once per original
split row), which :func:`read_bfmr` folds into one record that remembers every original split.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.imaging import PreprocessError, image_to_uint8, to_network_input

LABELS = ("not fractured", "fractured")
BFMR = "bfmr"
FRACATLAS = "fracatlas"
_FRACATLAS_ID = re.compile(r"(IMG\d{7})", re.IGNORECASE)
#: the directory name by which a file path shows which shared data set it lies in
SOURCE_DIRECTORIES = ((FRACATLAS, "fracatlas-train"), (BFMR, "bone-fracture"))


def source_of_path(path: str | Path) -> str | None:
    """``fracatlas`` or ``bfmr`` for a file under that shared data set's directory, else None.

    Evaluation reports name files by path only; this lets their figures be broken down by
    source, the two data sets coming from different hospitals and devices.
    """
    text = str(path)
    for source, directory in SOURCE_DIRECTORIES:
        if directory in text:
            return source
    return None


@dataclass(frozen=True)
class Record:
    """One distinct image file of a shared data set."""

    key: str  #: stable id: ``bfmr:<sha256>`` or ``fracatlas:<image id>``
    source: str  #: ``bfmr`` or ``fracatlas``
    path: Path
    label: int  #: 1 = fractured, 0 = not fractured
    sha256: str
    fracatlas_id: str | None = None
    #: original split rows of the bone fracture set (``train``/``val``/``test``)
    original_splits: tuple[str, ...] = field(default=())
    original_names: tuple[str, ...] = field(default=())


def label_to_int(label: str) -> int:
    try:
        return LABELS.index(label.strip().lower())
    except ValueError:
        raise ValueError(f"unknown label {label!r}; expected one of {LABELS}") from None


def read_bfmr(data_dir: Path) -> list[Record]:
    """Bone Fracture Multi-Region: one record per distinct file (sha256)."""
    data_dir = Path(data_dir)
    rows: dict[str, dict[str, Any]] = {}
    with open(data_dir / "manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            sha = row["sha256"]
            entry = rows.setdefault(
                sha, {"file": row["file"], "label": row["label"], "splits": [], "names": []}
            )
            if entry["label"] != row["label"]:
                raise ValueError(f"{sha} carries two labels in {data_dir / 'manifest.csv'}")
            entry["splits"].append(row["split"])
            entry["names"].append(row["original_path"])
    records = []
    for sha, entry in sorted(rows.items()):
        names: list[str] = entry["names"]
        ids = {m.group(1).upper() for n in names if (m := _FRACATLAS_ID.search(n))}
        records.append(
            Record(
                key=f"{BFMR}:{sha}",
                source=BFMR,
                path=data_dir / str(entry["file"]),
                label=label_to_int(str(entry["label"])),
                sha256=sha,
                fracatlas_id=min(ids) if ids else None,
                original_splits=tuple(entry["splits"]),
                original_names=tuple(names),
            )
        )
    return records


def read_fracatlas(data_dir: Path) -> list[Record]:
    """FracAtlas (training part): one record per FracAtlas image id."""
    data_dir = Path(data_dir)
    with open(data_dir / "manifest.csv", newline="") as fh:
        return [
            Record(
                key=f"{FRACATLAS}:{row['image_id']}",
                source=FRACATLAS,
                path=data_dir / row["file"],
                label=label_to_int(row["label"]),
                sha256=row["sha256"],
                fracatlas_id=row["image_id"].upper(),
            )
            for row in csv.DictReader(fh)
        ]


def read_all(bfmr_dir: Path | None, fracatlas_dir: Path | None) -> list[Record]:
    records: list[Record] = []
    if bfmr_dir is not None:
        records += read_bfmr(bfmr_dir)
    if fracatlas_dir is not None:
        records += read_fracatlas(fracatlas_dir)
    return records


@dataclass(frozen=True)
class Rejected:
    key: str
    path: Path
    reason: str


def integrity_problem(path: Path) -> str | None:
    """Why a picture file is damaged even if a decoder accepts it, or ``None``.

    A JPEG must end with the EOI marker (FF D9; trailing NUL padding allowed). Pillow decodes
    some truncated JPEGs without complaint and fills the missing rows with grey, which would
    train the network on a flat band; this catches them.
    """
    with open(path, "rb") as fh:
        head = fh.read(3)
        if head[:2] != b"\xff\xd8":
            return None
        fh.seek(0, 2)
        size = fh.tell()
        fh.seek(max(0, size - 4096))
        tail = fh.read().rstrip(b"\x00\r\n ")
    if not tail.endswith(b"\xff\xd9"):
        return f"truncated JPEG {Path(path).name}: no end-of-image marker ({size} bytes)"
    return None


def check_image(path: Path) -> str | None:
    """``None`` when the file decodes with the shared preprocessing and is intact, else why not."""
    try:
        problem = integrity_problem(path)
        if problem:
            return problem
        image_to_uint8(path)
    except PreprocessError as exc:
        return str(exc)
    except OSError as exc:
        return f"unreadable file {Path(path).name}: {exc}"
    return None


def load_gray(records: Iterable[Record]) -> Iterator[tuple[Record, np.ndarray | Rejected]]:
    """Decode each record with the shared preprocessing; unreadable or truncated files become
    :class:`Rejected` (Pillow refuses most truncated JPEGs; :func:`integrity_problem` the rest)."""
    for rec in records:
        try:
            problem = integrity_problem(rec.path)
            if problem:
                yield rec, Rejected(rec.key, rec.path, problem)
                continue
            yield rec, image_to_uint8(rec.path)
        except PreprocessError as exc:
            yield rec, Rejected(rec.key, rec.path, str(exc))
        except FileNotFoundError as exc:
            yield rec, Rejected(rec.key, rec.path, f"missing file: {exc}")


def network_input(gray: np.ndarray, size: int) -> np.ndarray:
    """The exact inference path for pictures: ``to_network_input(image_to_uint8(path))``."""
    return to_network_input(gray, size)


def read_labelled_csv(csv_path: Path) -> list[tuple[Path, int]]:
    """An evaluation manifest: columns ``file`` and ``label``, paths relative to the CSV."""
    csv_path = Path(csv_path)
    out = []
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"file", "label"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path} needs columns 'file' and 'label'")
        for row in reader:
            path = Path(row["file"])
            if not path.is_absolute():
                path = csv_path.parent / path
            out.append((path, label_to_int(row["label"])))
    return out
