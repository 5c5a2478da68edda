"""Evaluation manifests (``file,label`` CSVs, paths relative to the CSV) for the two figures.

* ``leakage_free_{train,val,test}.csv``: the committed split (``model/splits/split_v1.csv``);
* ``original_{train,val,test}.csv``: the bone fracture set's own split, one row per distinct
  file per split (the figure the notebook reported).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from model.training.data import LABELS, Record, check_image, read_all
from model.training.split import read_split_csv


def write_manifest(path: Path, records: Sequence[Record]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["file", "label", "key"])
        for rec in records:
            rel = os.path.relpath(rec.path.resolve(), path.parent.resolve())
            w.writerow([rel, LABELS[rec.label], rec.key])
    return len(records)


def main(argv: Sequence[str] | None = None) -> int:
    repo = Path(__file__).resolve().parents[2]
    shared = repo.parent / "shared" / "datasets"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bfmr-dir", type=Path, default=shared / "bone-fracture-multi-region")
    p.add_argument("--fracatlas-dir", type=Path, default=shared / "fracatlas-train")
    p.add_argument("--split", type=Path, default=repo / "model/splits/split_v1.csv")
    p.add_argument("--out-dir", type=Path, required=True)
    args = p.parse_args(argv)
    records = read_all(args.bfmr_dir, args.fracatlas_dir)
    table = read_split_csv(args.split)
    for name in ("train", "val", "test"):
        chosen = [r for r in records if r.key in table and table[r.key][1] == name]
        n = write_manifest(args.out_dir / f"leakage_free_{name}.csv", chosen)
        print(f"leakage_free_{name}.csv: {n}")
        # the original split keeps its damaged files; the evaluation reports them as errors
        orig = [r for r in records if name in r.original_splits]
        n = write_manifest(args.out_dir / f"original_{name}.csv", orig)
        bad = sum(1 for r in orig if check_image(r.path))
        print(f"original_{name}.csv: {n} ({bad} damaged)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
