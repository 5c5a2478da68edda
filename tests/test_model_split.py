"""The committed leakage-free split: its invariants, and the near-duplicate detector."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
from PIL import Image

from model.imaging import image_to_uint8
from model.training.data import check_image, read_all
from model.training.split import (
    assign_splits,
    dihedral_distance_to_all,
    dihedral_hashes,
    group_records,
)
from tests.conftest import REPO, SHARED, require

SPLIT = REPO / "model" / "splits" / "split_v1.csv"
AUDIT = SPLIT.with_suffix(".audit.json")
BFMR = SHARED / "datasets" / "bone-fracture-multi-region"
FRACATLAS = SHARED / "datasets" / "fracatlas-train"


def _rows() -> list[dict[str, str]]:
    with open(require(SPLIT), newline="") as fh:
        return list(csv.DictReader(fh))


def test_split_covers_every_image_once_and_no_group_straddles() -> None:
    rows = _rows()
    records = read_all(require(BFMR), require(FRACATLAS))
    assert sorted(r["key"] for r in rows) == sorted(r.key for r in records)
    sides: dict[str, set[str]] = defaultdict(set)
    ids: dict[str, set[str]] = defaultdict(set)
    for r in rows:
        assert r["split"] in {"train", "val", "test", "excluded"}
        if r["split"] != "excluded":
            sides[r["group"]].add(r["split"])
            if r["image_id"]:
                ids[r["image_id"]].add(r["split"])
    assert all(len(s) == 1 for s in sides.values())
    assert all(len(s) == 1 for s in ids.values())  # a FracAtlas id lives on one side only
    counts = {s: sum(1 for r in rows if r["split"] == s) for s in ("train", "val", "test")}
    assert counts["test"] >= 400 and counts["val"] >= 400 and counts["train"] > 3 * counts["test"]
    for label in ("fractured", "not fractured"):
        assert any(r["split"] == "test" and r["label"] == label for r in rows)


def test_excluded_files_are_the_damaged_ones() -> None:
    by_key = {r.key: r for r in read_all(require(BFMR), require(FRACATLAS))}
    excluded = [r["key"] for r in _rows() if r["split"] == "excluded"]
    assert len(excluded) >= 6  # the README names six truncated JPEGs
    for key in excluded:
        assert check_image(by_key[key].path) is not None, key


def test_audit_reports_no_test_image_near_train() -> None:
    audit = json.loads(require(AUDIT).read_text())
    assert audit["audit"]["test_images_with_near_duplicate_in_train"] == 0
    assert audit["audit"]["val_images_with_near_duplicate_in_train"] == 0
    assert audit["audit"]["groups_on_two_sides"] == 0
    assert audit["audit"]["test_min_phash_distance_to_train"] > audit["threshold_bits"]


def test_sampled_test_train_pairs_are_not_near_duplicates() -> None:
    """Recompute the D4 pHash for a sample of test and train images (independent of the
    stored audit) and check no pair is within the threshold."""
    threshold = json.loads(require(AUDIT).read_text())["threshold_bits"]
    rows = _rows()
    by_key = {r.key: r for r in read_all(require(BFMR), require(FRACATLAS))}
    rng = np.random.default_rng(0)
    test = [r["key"] for r in rows if r["split"] == "test"]
    train = [r["key"] for r in rows if r["split"] == "train"]
    sample = list(rng.choice(test, 20, replace=False)) + list(rng.choice(train, 120, replace=False))
    hashes = np.array(
        [dihedral_hashes(image_to_uint8(by_key[k].path)) for k in sample], dtype=np.uint64
    )
    for i in range(20):
        d = dihedral_distance_to_all(hashes, i)[20:]
        assert d.min() > threshold, (sample[i], int(d.min()))


def test_dihedral_phash_finds_rotated_flipped_and_rescaled_copies() -> None:
    paths = sorted(require(FRACATLAS / "images").glob("*.jpg"))[:2]
    a = image_to_uint8(paths[0])
    copies = [
        np.rot90(a, 1),
        np.fliplr(a),
        np.rot90(np.flipud(a), 3),
        np.asarray(Image.fromarray(a).resize((a.shape[1] * 3 // 5, a.shape[0] * 3 // 5))),
    ]
    other = image_to_uint8(paths[1])
    hashes = np.array([dihedral_hashes(x) for x in [a, *copies, other]], dtype=np.uint64)
    d = dihedral_distance_to_all(hashes, 0)
    assert list(d[1:4]) == [0, 0, 0]
    assert d[4] <= 4  # rescaled to 60 %
    assert d[5] > 10  # a different radiograph


def test_whole_groups_go_to_one_split() -> None:
    from model.training.data import Record

    n = 60
    records = [
        Record(
            f"x:{i}",
            "x",
            Path(f"{i}.png"),
            i % 2,
            f"{i:064x}",
            f"IMG{i % 7:07d}" if i < 14 else None,
        )
        for i in range(n)
    ]
    linked = np.zeros((n, n), dtype=bool)
    for a, b in [(20, 21), (21, 22), (30, 45), (50, 59)]:
        linked[a, b] = linked[b, a] = True
    valid = np.ones(n, dtype=bool)
    valid[59] = False
    groups = group_records(records, linked, valid)
    assert groups[20] == groups[21] == groups[22] and groups[30] == groups[45]
    assert groups[0] == groups[7]  # same FracAtlas id
    assert groups[50] != groups[59]  # an excluded image links nothing
    splits = assign_splits([r.label for r in records], groups, valid.tolist(), seed=1)
    assert splits[59] == "excluded"
    for g in set(groups):
        assert (
            len({s for s, gg in zip(splits, groups, strict=True) if gg == g and s != "excluded"})
            <= 1
        )
    assert assign_splits([r.label for r in records], groups, valid.tolist(), seed=1) == splits
