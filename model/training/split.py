"""Leakage audit and the leakage-free train / val / test split.

Method (defensible, and checked by the audit it writes):

* Every distinct image (bone fracture set by sha256, FracAtlas by image id) is decoded with the
  shared preprocessing (:func:`model.imaging.image_to_uint8`); unreadable or truncated files
  are excluded and listed.
* A 64-bit perceptual hash (DCT pHash, :func:`imagehash.phash`) is taken of each image under all
  8 rotations by 90 degrees and flips (the dihedral group D4). pHash works on a 32x32 downscale,
  so rescaled copies and FracAtlas' aspect-stretched 640x640 re-export hash alike; slight crops
  and re-encoding move a few bits. The distance between two images is the smallest Hamming
  distance between one image's 8 hashes and the other's untransformed hash (symmetrised).
* Two images are near-duplicates when that distance is at most ``threshold`` bits. The default is
  calibrated on the data and reported: the copies named ``N-rotatedA-rotatedB.jpg`` of one
  radiograph give the distances of true duplicates, random pairs give those of unrelated images.
* The same FracAtlas image id (``IMG000xxxx``) in both sets is always one group.
* Union-find over all links gives the groups; whole groups are assigned to train / val / test
  with a fixed seed, stratified by the group's label, by image count.

The committed CSV lists every image: ``key,source,sha256,image_id,label,group,split``
(``split`` is ``excluded`` for unreadable files).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from model.artifact import file_sha256
from model.imaging import PreprocessError, image_to_uint8
from model.training.data import LABELS, Record, integrity_problem, read_all

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.70, 0.15, 0.15)
DEFAULT_THRESHOLD = 4
DEFAULT_SIMILARITY = 0.85
DEFAULT_SEED = 20261124
_STEM = re.compile(r"^(?P<label>[^/]+/[^/]+)/(?P<num>\d+)-rotated")


def dihedral(gray: np.ndarray) -> list[np.ndarray]:
    """The 8 images of the dihedral group D4: 4 rotations of the image and of its mirror."""
    out = []
    for img in (gray, np.fliplr(gray)):
        for k in range(4):
            out.append(np.rot90(img, k))
    return out


def phash64(gray: np.ndarray) -> int:
    import imagehash
    from PIL import Image

    bits = imagehash.phash(Image.fromarray(np.ascontiguousarray(gray))).hash.flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


def dihedral_hashes(gray: np.ndarray) -> list[int]:
    return [phash64(t) for t in dihedral(gray)]


def _hash_file(path: Path) -> list[int] | str:
    try:
        return dihedral_hashes(image_to_uint8(path))
    except PreprocessError as exc:
        return str(exc)
    except FileNotFoundError as exc:
        return f"missing file: {exc}"


def hash_records(
    records: Sequence[Record], workers: int = 2, progress: bool = True
) -> tuple[np.ndarray, dict[str, str]]:
    """``(N, 8)`` uint64 hashes (row of zeros for rejects) and ``key -> reason`` for rejects."""
    hashes = np.zeros((len(records), 8), dtype=np.uint64)
    rejected: dict[str, str] = {}
    paths = [r.path for r in records]
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for i, result in enumerate(pool.map(_hash_file, paths, chunksize=16)):
            if isinstance(result, str):
                rejected[records[i].key] = result
            else:
                hashes[i] = np.array(result, dtype=np.uint64)
            if progress and (i + 1) % 500 == 0:
                print(f"  hashed {i + 1}/{len(records)} ({time.time() - t0:.0f}s)", flush=True)
    return hashes, rejected


def dihedral_distance_to_all(hashes: np.ndarray, i: int) -> np.ndarray:
    """Distance from image ``i`` (untransformed) to every image under its best D4 transform."""
    d = np.bitwise_count(hashes ^ hashes[i, 0]).min(axis=1)
    return d.astype(np.int16)


def distance_matrix(hashes: np.ndarray) -> np.ndarray:
    """Symmetric ``(N, N)`` int16 matrix of D4-invariant pHash distances."""
    n = len(hashes)
    dist = np.empty((n, n), dtype=np.int16)
    for i in range(n):
        dist[i] = dihedral_distance_to_all(hashes, i)
    return np.minimum(dist, dist.T)


def embedding_similarity(embeddings: np.ndarray, chunk: int = 512) -> np.ndarray:
    """Symmetric ``(N, N)`` float16 cosine similarity of ImageNet embeddings, best over the cached
    views (view 0 = the image itself, others = rotated/flipped/zoomed copies) of either image."""
    e = np.asarray(embeddings, dtype=np.float32)
    e /= np.linalg.norm(e, axis=-1, keepdims=True) + 1e-8
    n, views, dim = e.shape
    flat = e.reshape(n * views, dim)
    sim = np.empty((n, n), dtype=np.float16)
    for start in range(0, n, chunk):
        block = e[start : start + chunk, 0] @ flat.T
        sim[start : start + chunk] = block.reshape(-1, n, views).max(axis=2)
    return np.maximum(sim, sim.T)


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, a: int) -> int:
        while self.parent[a] != a:
            self.parent[a] = self.parent[self.parent[a]]
            a = self.parent[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def near_duplicates(
    dist: np.ndarray, sim: np.ndarray, threshold: int, min_similarity: float
) -> np.ndarray:
    """The link rule: pHash within ``threshold`` bits under a D4 transform, or embedding
    cosine similarity at least ``min_similarity`` (small-angle rotations, crops, zooms)."""
    return (dist <= threshold) | (sim >= min_similarity)


def group_records(records: Sequence[Record], linked: np.ndarray, valid: np.ndarray) -> list[int]:
    """Union-find group index per record (near-duplicates and shared FracAtlas ids)."""
    uf = UnionFind(len(records))
    ii, jj = np.nonzero(np.triu(linked, k=1) & valid[:, None] & valid[None, :])
    for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
        uf.union(i, j)
    by_id: dict[str, int] = {}
    for i, rec in enumerate(records):
        if rec.fracatlas_id:
            if rec.fracatlas_id in by_id:
                uf.union(by_id[rec.fracatlas_id], i)
            else:
                by_id[rec.fracatlas_id] = i
    roots = [uf.find(i) for i in range(len(records))]
    renumber: dict[int, int] = {}
    return [renumber.setdefault(r, len(renumber)) for r in roots]


def assign_splits(
    labels: Sequence[int],
    groups: Sequence[int],
    valid: Sequence[bool],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
    sources: Sequence[str] = (),
) -> list[str]:
    """Whole groups to splits: per stratum (group majority source and label), groups (largest first,
    seeded random order among equal sizes) go to the split furthest below its target share."""
    members: dict[int, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        if valid[i]:
            members[g].append(i)
    rng = np.random.default_rng(seed)
    out = ["excluded"] * len(labels)
    strata: dict[tuple[str, int], list[int]] = defaultdict(list)
    for g, idx in sorted(members.items()):
        positives = sum(labels[i] for i in idx)
        # Stratify by source too: otherwise the bone fracture set's big clusters fill train
        # and FracAtlas' many singletons end up nearly all in val/test.
        source = Counter(sources[i] for i in idx).most_common(1)[0][0] if sources else ""
        strata[(source, int(2 * positives >= len(idx)))].append(g)
    for stratum in sorted(strata):
        order = list(strata[stratum])
        rng.shuffle(order)
        # Largest groups first (seeded order among equals): big clusters of copies land in
        # train, where the deficit is largest, and the small groups fill val and test evenly.
        order.sort(key=lambda g: -len(members[g]))
        counts = np.zeros(len(SPLITS))
        total = sum(len(members[g]) for g in order)
        for g in order:
            deficit = np.asarray(fractions) * total - counts
            s = int(np.argmax(deficit))
            counts[s] += len(members[g])
            for i in members[g]:
                out[i] = SPLITS[s]
    return out


def write_split_csv(
    path: Path, records: Sequence[Record], groups: Sequence[int], splits: Sequence[str]
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["key", "source", "sha256", "image_id", "label", "group", "split"])
        for rec, g, s in zip(records, groups, splits, strict=True):
            w.writerow(
                [rec.key, rec.source, rec.sha256, rec.fracatlas_id or "", LABELS[rec.label], g, s]
            )


def read_split_csv(path: Path) -> dict[str, tuple[int, str]]:
    """``key -> (group, split)`` from a committed split file."""
    with open(path, newline="") as fh:
        return {row["key"]: (int(row["group"]), row["split"]) for row in csv.DictReader(fh)}


def _stem_pairs(records: Sequence[Record], valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Pairs of different files sharing a ``<split>/<label>/<N>-rotated...`` name stem: the
    data set's own augmented copies of one radiograph (small-angle rotations and zooms)."""
    stems: dict[str, set[int]] = defaultdict(set)
    for i, rec in enumerate(records):
        if valid[i]:
            for name in rec.original_names:
                m = _STEM.match(name)
                if m:
                    stems[f"{m.group('label')}/{m.group('num')}"].add(i)
    a, b = [], []
    for idx_set in stems.values():
        idx = sorted(idx_set)
        for x in range(len(idx)):
            for y in range(x + 1, len(idx)):
                a.append(idx[x])
                b.append(idx[y])
    return np.asarray(a, dtype=int), np.asarray(b, dtype=int)


def calibration(
    records: Sequence[Record],
    dist: np.ndarray,
    sim: np.ndarray,
    valid: np.ndarray,
    seed: int,
) -> dict[str, object]:
    """Distances of known copies against random pairs, to justify both thresholds."""
    pa, pb = _stem_pairs(records, valid)
    rng = np.random.default_rng(seed)
    ok = np.flatnonzero(valid)
    ra, rb = rng.choice(ok, 200_000), rng.choice(ok, 200_000)
    keep = ra != rb
    ra, rb = ra[keep], rb[keep]
    bits = range(0, 21, 2)
    sims = (0.80, 0.85, 0.88, 0.90, 0.92, 0.94, 0.96, 0.98)

    def cdf(d: np.ndarray) -> dict[str, float]:
        return {str(t): round(float((d <= t).mean()), 6) for t in bits} if len(d) else {}

    def sf(x: np.ndarray) -> dict[str, float]:
        return {str(t): round(float((x >= t).mean()), 6) for t in sims} if len(x) else {}

    return {
        "known_copy_pairs": len(pa),
        "known_copy_phash_within_bits": cdf(dist[pa, pb]),
        "known_copy_similarity_at_least": sf(sim[pa, pb].astype(np.float32)),
        "random_pairs": len(ra),
        "random_phash_within_bits": cdf(dist[ra, rb]),
        "random_similarity_at_least": sf(sim[ra, rb].astype(np.float32)),
    }


def audit(
    records: Sequence[Record],
    dist: np.ndarray,
    sim: np.ndarray,
    linked: np.ndarray,
    groups: Sequence[int],
    splits: Sequence[str],
) -> dict[str, object]:
    """The facts the split must satisfy, computed over all pairs, not a sample."""
    sp = np.asarray(splits)
    train = np.flatnonzero(sp == "train")
    report: dict[str, object] = {}
    ids_train = {records[int(i)].fracatlas_id for i in train if records[int(i)].fracatlas_id}
    for name in ("val", "test"):
        idx = np.flatnonzero(sp == name)
        block = np.ix_(idx, train)
        report[f"{name}_images_with_near_duplicate_in_train"] = int(linked[block].any(axis=1).sum())
        report[f"{name}_min_phash_distance_to_train"] = int(dist[block].min())
        best = sim[block].astype(np.float32).max(axis=1)
        report[f"{name}_max_similarity_to_train"] = round(float(best.max()), 4)
        report[f"{name}_nearest_train_similarity_percentiles"] = {
            str(p): round(float(np.percentile(best, p)), 4) for p in (50, 90, 99, 100)
        }
        report[f"{name}_fracatlas_ids_also_in_train"] = sum(
            1 for i in idx.tolist() if records[i].fracatlas_id in ids_train
        )
    group_splits: dict[int, set[str]] = defaultdict(set)
    for g, s in zip(groups, splits, strict=True):
        if s != "excluded":
            group_splits[g].add(s)
    report["groups_on_two_sides"] = sum(1 for v in group_splits.values() if len(v) > 1)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    repo = Path(__file__).resolve().parents[2]
    shared = repo.parent / "shared" / "datasets"
    parser.add_argument("--bfmr-dir", type=Path, default=shared / "bone-fracture-multi-region")
    parser.add_argument("--fracatlas-dir", type=Path, default=shared / "fracatlas-train")
    parser.add_argument("--cache", type=Path, required=True, help="from model.training.features")
    parser.add_argument("--out", type=Path, default=repo / "model" / "splits" / "split_v1.csv")
    parser.add_argument("--threshold", type=int, default=DEFAULT_THRESHOLD, help="pHash bits")
    parser.add_argument("--min-similarity", type=float, default=DEFAULT_SIMILARITY)
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--hash-cache", type=Path, default=None, help="npz of computed hashes")


def run(args: argparse.Namespace) -> int:
    from model.training.features import Cache

    t0 = time.time()
    records = read_all(args.bfmr_dir, args.fracatlas_dir)
    print(f"{len(records)} distinct images", flush=True)
    if args.hash_cache is not None and args.hash_cache.is_file():
        saved = np.load(args.hash_cache, allow_pickle=False)
        assert list(saved["keys"]) == [r.key for r in records], "hash cache is for other data"
        hashes = saved["hashes"]
        rejected = dict(zip(saved["rej_keys"].tolist(), saved["rej_reasons"].tolist(), strict=True))
    else:
        hashes, rejected = hash_records(records, workers=args.workers)
        if args.hash_cache is not None:
            np.savez(
                args.hash_cache,
                keys=np.array([r.key for r in records]),
                hashes=hashes,
                rej_keys=np.array(list(rejected), dtype=str),
                rej_reasons=np.array(list(rejected.values()), dtype=str),
            )
    cache = Cache(args.cache)
    assert cache.keys == [r.key for r in records], "feature cache is for other data"
    rejected.update(cache.rejected)
    for rec in records:
        problem = integrity_problem(rec.path)
        if problem and rec.key not in rejected:
            rejected[rec.key] = problem
    valid = np.array([r.key not in rejected for r in records])
    for key, reason in sorted(rejected.items()):
        print(f"excluded {key}: {reason}")
    dist = distance_matrix(hashes)
    sim = embedding_similarity(cache.embeddings)
    linked = near_duplicates(dist, sim, args.threshold, args.min_similarity)
    groups = group_records(records, linked, valid)
    splits = assign_splits(
        [r.label for r in records],
        groups,
        valid.tolist(),
        seed=args.seed,
        sources=[r.source for r in records],
    )
    write_split_csv(args.out, records, groups, splits)

    sizes = Counter(g for g, ok in zip(groups, valid, strict=True) if ok)
    split_counts = Counter((s, LABELS[r.label]) for r, s in zip(records, splits, strict=True))
    source_counts = Counter((s, r.source) for r, s in zip(records, splits, strict=True))
    orig_test = [i for i, r in enumerate(records) if valid[i] and "test" in r.original_splits]
    orig_train = [i for i, r in enumerate(records) if valid[i] and "train" in r.original_splits]
    orig_leak = linked[np.ix_(orig_test, orig_train)].any(axis=1)
    report = {
        "split_file": str(args.out.name),
        "split_file_sha256": file_sha256(args.out),
        "manifests_sha256": {
            "bone-fracture-multi-region": file_sha256(args.bfmr_dir / "manifest.csv"),
            "fracatlas-train": file_sha256(args.fracatlas_dir / "manifest.csv"),
        },
        "method": "near-duplicate = pHash (64 bit) within threshold bits under one of the 8 D4 "
        "transforms, or cosine similarity >= min_similarity of ImageNet MobileNetV2 embeddings "
        "(best over the image and its rotated/flipped/zoomed views), or the same FracAtlas image "
        "id; union-find; whole groups to splits (largest first), stratified by source and label",
        "threshold_bits": args.threshold,
        "min_similarity": args.min_similarity,
        "seed": args.seed,
        "images": len(records),
        "excluded": {k: v for k, v in sorted(rejected.items())},
        "groups": len(sizes),
        "singleton_groups": sum(1 for v in sizes.values() if v == 1),
        "largest_groups": sorted(sizes.values(), reverse=True)[:10],
        "groups_per_split": {
            s: len({g for g, x in zip(groups, splits, strict=True) if x == s}) for s in SPLITS
        },
        "images_per_split_and_label": {
            f"{s}/{lab}": n for (s, lab), n in sorted(split_counts.items())
        },
        "images_per_split_and_source": {
            f"{s}/{src}": n for (s, src), n in sorted(source_counts.items())
        },
        "original_split": {
            "distinct_test_images": len(orig_test),
            "test_images_with_near_duplicate_in_original_train": int(orig_leak.sum()),
        },
        "calibration": calibration(records, dist, sim, valid, args.seed),
        "audit": audit(records, dist, sim, linked, groups, splits),
        "seconds": round(time.time() - t0, 1),
    }
    report_path = args.out.with_suffix(".audit.json")
    report_path.write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(report, args.out.with_suffix(".audit.md"))
    show = ("groups", "largest_groups", "groups_per_split", "images_per_split_and_label", "audit")
    print(json.dumps({k: report[k] for k in show}, indent=1))
    return 0


def write_markdown(report: dict, path: Path) -> None:  # type: ignore[type-arg]
    a = report["audit"]
    cal = report["calibration"]
    lines = [
        f"# Leakage audit of `{report['split_file']}`",
        "",
        f"- Split file sha256: `{report['split_file_sha256']}`",
        f"- Method: {report['method']}.",
        f"- pHash threshold {report['threshold_bits']} bits; embedding similarity threshold "
        f"{report['min_similarity']}; seed {report['seed']}.",
        f"- Images: {report['images']}; excluded (unreadable): {len(report['excluded'])}",
        f"- Groups: {report['groups']} ({report['singleton_groups']} singletons); largest "
        f"groups: {report['largest_groups']}",
        f"- Groups per split: {report['groups_per_split']}",
        f"- Images per split and label: {report['images_per_split_and_label']}",
        f"- Images per split and source: {report['images_per_split_and_source']}",
        "",
        "## No test image has a near-duplicate in train",
        "",
        f"- Test images linked to any train image by the rule above: "
        f"**{a['test_images_with_near_duplicate_in_train']}** (val: "
        f"{a['val_images_with_near_duplicate_in_train']}).",
        f"- Smallest test-train pHash distance (any D4 transform): "
        f"{a['test_min_phash_distance_to_train']} bits; highest test-train embedding similarity: "
        f"{a['test_max_similarity_to_train']}; percentiles of each test image's best train "
        f"match: {a['test_nearest_train_similarity_percentiles']}.",
        f"- FracAtlas ids of test also in train: {a['test_fracatlas_ids_also_in_train']}.",
        f"- Groups on two sides: {a['groups_on_two_sides']}.",
        "",
        "## Why these thresholds",
        "",
        f"- {cal['known_copy_pairs']} pairs of known copies (same `<label>/<N>-rotated...` name "
        f"stem): pHash fraction within t bits {cal['known_copy_phash_within_bits']}; "
        f"similarity fraction at least s {cal['known_copy_similarity_at_least']}",
        f"- {cal['random_pairs']} random pairs: pHash {cal['random_phash_within_bits']}; "
        f"similarity {cal['random_similarity_at_least']}",
        "",
        "## The original split, for comparison",
        "",
        f"- {report['original_split']['test_images_with_near_duplicate_in_original_train']} of "
        f"{report['original_split']['distinct_test_images']} distinct original test images have "
        "a near-duplicate in the original train split by the same rule.",
        "",
        "## Excluded files",
        "",
    ]
    lines += [f"- `{k}`: {v}" for k, v in report["excluded"].items()] or ["- none"]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
