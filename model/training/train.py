"""Train the MobileNetV2 fracture classifier and write a model artifact.

Transfer learning in two phases, on cached activations of the frozen lower network
(:mod:`model.training.features`: every image under several augmented views, view 0 = the exact
inference input):

1. *Frozen base*: all of MobileNetV2 frozen, only the sigmoid head trains (on the cached
   pooled ImageNet embeddings).
2. *Fine-tuning the top*: every layer after the cache's cut layer unfrozen (batch-norm
   statistics kept frozen, as usual for fine-tuning), trained at a low learning rate on the
   cached activations of the cut layer (see :mod:`model.training.features`).

Every epoch draws one random view per training image (rotation / flip / zoom / shift / contrast
augmentation); validation uses view 0. Class weights balance the labels, and clusters of
near-identical training images (the bone fracture set holds many re-exported copies of one
radiograph) are down-weighted by ``1 / sqrt(cluster size)`` so a copied radiograph does not
count many times over. Early stopping on
validation loss keeps the best epoch; ``best_model.keras`` is the whole network (Rescaling +
MobileNetV2 + head) taking 0..255 RGB images, the threshold is chosen on validation data for
the target sensitivity.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.artifact import MODEL_FILE, ModelCard, file_sha256, write_card
from model.training.data import Record, integrity_problem, read_all
from model.training.features import CUT_LAYER, Cache, build_cache, split_network
from model.training.metrics import binary_metrics, threshold_for_sensitivity

HISTORY_FILE = "history.json"


def select(records: Sequence[Record], mode: str, split_csv: Path | None) -> dict[str, list[str]]:
    """Keys of train / val / test: ``leakage-free`` from the split CSV, or ``original``: the
    bone fracture set's own (leaky) split, as the notebook used it."""
    if mode == "original":
        out: dict[str, list[str]] = {"train": [], "val": [], "test": []}
        for rec in records:
            for name in ("train", "val", "test"):
                if name in rec.original_splits:
                    out[name].append(rec.key)
        return out
    if split_csv is None:
        raise ValueError("--split is required for the leakage-free split")
    from model.training.split import read_split_csv

    table = read_split_csv(split_csv)
    return {
        name: [r.key for r in records if r.key in table and table[r.key][1] == name]
        for name in ("train", "val", "test")
    }


class ViewSampler:
    """Training batches: one random cached view per image and epoch, with class weights."""

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        batch_size: int,
        seed: int,
        weights: dict[int, float],
        sample_weights: np.ndarray | None = None,
    ) -> None:
        self.features, self.labels = features, labels
        self.batch_size = batch_size
        self.rng = np.random.default_rng(seed)
        per_class = np.array([weights[0], weights[1]], dtype=np.float32)[labels]
        extra = np.ones(len(labels), np.float32) if sample_weights is None else sample_weights
        self.weights = (per_class * extra).astype(np.float32)

    def epoch(self) -> Any:
        import tensorflow as tf

        n, views = self.features.shape[:2]
        order = self.rng.permutation(n)
        chosen = np.asarray(self.rng.integers(0, views, size=n))

        def gen() -> Any:
            for start in range(0, n, self.batch_size):
                idx: np.ndarray = order[start : start + self.batch_size]
                x = self.features[idx, chosen[idx]].astype(np.float32)
                y = self.labels[idx].astype(np.float32)
                yield x, y, self.weights[idx]

        spec = tf.TensorSpec((None, *self.features.shape[2:]), tf.float32)
        sig = (spec, tf.TensorSpec((None,), tf.float32), tf.TensorSpec((None,), tf.float32))
        return tf.data.Dataset.from_generator(gen, output_signature=sig).prefetch(2)


def duplicate_weights(embeddings: np.ndarray, min_similarity: float) -> np.ndarray:
    """Per-image weights ``1 / sqrt(cluster size)`` (mean 1) over clusters of near-identical
    training images (embedding cosine >= ``min_similarity`` over the cached views): a
    radiograph copied 20 times in the data set should not count 20 times as much."""
    from model.training.split import UnionFind, embedding_similarity

    sim = embedding_similarity(embeddings)
    uf = UnionFind(len(sim))
    ii, jj = np.nonzero(np.triu(sim >= min_similarity, k=1))
    for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
        uf.union(i, j)
    roots = np.array([uf.find(i) for i in range(len(sim))])
    _, inverse, counts = np.unique(roots, return_inverse=True, return_counts=True)
    w = 1.0 / np.sqrt(counts[inverse])
    return (w / w.mean()).astype(np.float32)


def class_weights(labels: np.ndarray) -> dict[int, float]:
    n = len(labels)
    pos = int(labels.sum())
    return {0: n / (2 * max(n - pos, 1)), 1: n / (2 * max(pos, 1))}


def fit_phase(
    model: Any,
    sampler: ViewSampler,
    val: tuple[np.ndarray, np.ndarray],
    epochs: int,
    patience: int,
    phase: str,
    history: list[dict[str, Any]],
    on_best: Any = None,
    reduce_lr_after: int = 0,
) -> None:
    """Epoch loop with early stopping on validation loss; best weights restored at the end.

    With ``reduce_lr_after`` > 0 the learning rate is cut to 30 % each time validation loss
    has not improved on this phase's own best epoch for that many epochs (Keras'
    ReduceLROnPlateau rule), before ``patience`` ends the phase."""
    # The phase starts from the previous phase's best: it must beat that, not infinity.
    best = float(model.evaluate(val[0], val[1], batch_size=256, verbose=0)[0])
    best_weights, waited = model.get_weights(), 0
    # the plateau is judged against this phase's epochs only: the first fine-tuning epochs
    # may still be worse than the previous phase while they improve quickly
    phase_best, stalled = float("inf"), 0
    print(f"[{phase}] start val_loss {best:.4f}", flush=True)
    for epoch in range(epochs):
        t0 = time.time()
        h = model.fit(sampler.epoch(), epochs=1, verbose=0)
        val_loss, val_acc = model.evaluate(val[0], val[1], batch_size=256, verbose=0)
        row = {
            "phase": phase,
            "epoch": epoch + 1,
            "loss": float(h.history["loss"][-1]),
            "accuracy": float(h.history["accuracy"][-1]),
            "val_loss": float(val_loss),
            "val_accuracy": float(val_acc),
            "seconds": round(time.time() - t0, 1),
        }
        history.append(row)
        improved = val_loss < best - 1e-4
        if val_loss < phase_best - 1e-4:
            phase_best, stalled = val_loss, 0
        else:
            stalled += 1
            if reduce_lr_after and stalled % reduce_lr_after == 0:
                lr = model.optimizer.learning_rate
                lr.assign(float(lr.numpy()) * 0.3)
                print(f"[{phase}] learning rate -> {float(lr.numpy()):.2e}", flush=True)
        print(
            f"[{phase}] epoch {epoch + 1}/{epochs} loss {row['loss']:.4f} acc {row['accuracy']:.3f}"
            f" val_loss {val_loss:.4f} val_acc {val_acc:.3f} ({row['seconds']}s)"
            + (" *" if improved else ""),
            flush=True,
        )
        if improved:
            best, best_weights, waited = val_loss, model.get_weights(), 0
            if on_best is not None:
                on_best()
        else:
            waited += 1
            if waited >= patience:
                print(f"[{phase}] early stop: no val_loss improvement for {patience} epochs")
                break
    model.set_weights(best_weights)


def train(args: argparse.Namespace) -> dict[str, Any]:
    import keras

    t_start = time.time()
    keras.utils.set_random_seed(args.seed)
    records = read_all(args.bfmr_dir, args.fracatlas_dir)
    sets = select(records, args.split_mode, args.split)
    if args.limit:
        rng = np.random.default_rng(args.seed)
        sets = {k: sorted(rng.permutation(v)[: args.limit].tolist()) for k, v in sets.items()}
    wanted = {k for keys in sets.values() for k in keys}
    if args.cache is not None and (args.cache / "keys.json").is_file():
        cache = Cache(args.cache)
    else:
        cache_dir = args.cache or (args.out / "cache")
        use = [r for r in records if r.key in wanted]
        build_cache(
            use,
            cache_dir,
            args.size,
            args.weights,
            views=args.views,
            seed=args.seed,
            cut=args.cut_layer,
        )
        cache = Cache(cache_dir)
    if cache.size != args.size:
        raise ValueError(f"cache is for input size {cache.size}, not {args.size}")
    labels_by_key = {r.key: r.label for r in records}
    # Damaged files never train or validate, whichever split they come from.
    damaged = {r.key for r in records if r.key in wanted and integrity_problem(r.path)}

    def arrays(keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = [
            k for k in keys if k in cache.index and k not in cache.rejected and k not in damaged
        ]
        idx = np.array(sorted(cache.index[k] for k in keys), dtype=int)
        y = np.array([labels_by_key[cache.keys[i]] for i in idx], dtype=np.int64)
        return np.asarray(cache.features[idx]), np.asarray(cache.embeddings[idx]), y

    (xf_tr, xe_tr, y_tr), (xf_va, xe_va, y_va), (_, _, y_te) = (
        arrays(sets["train"]),
        arrays(sets["val"]),
        arrays(sets["test"]),
    )
    print(
        f"train {len(y_tr)} ({int(y_tr.sum())} fractured), val {len(y_va)} "
        f"({int(y_va.sum())}), test {len(y_te)} ({int(y_te.sum())}); "
        f"{xf_tr.shape[1]} views; input {args.size}",
        flush=True,
    )
    from model.training.network import build_classifier

    model, base = build_classifier(args.size, weights=args.weights, dropout=args.dropout)
    _, (top, embed) = split_network(model, base, cache.cut_layer)
    weights = class_weights(y_tr)
    dup_w = None
    if args.dedup_similarity < 1.0:
        dup_w = duplicate_weights(xe_tr, args.dedup_similarity)
        print(
            f"duplicate weights: min {dup_w.min():.3f}, max {dup_w.max():.3f} "
            f"(clusters at similarity >= {args.dedup_similarity})",
            flush=True,
        )
    history: list[dict[str, Any]] = []
    args.out.mkdir(parents=True, exist_ok=True)

    # Phase 1: frozen base, head only (on the cached pooled embeddings).
    feat_in = keras.Input(shape=(xe_tr.shape[-1],))
    head = keras.Model(
        feat_in, model.get_layer("fracture_probability")(model.get_layer("dropout")(feat_in))
    )
    head.compile(keras.optimizers.Adam(args.lr_head), "binary_crossentropy", metrics=["accuracy"])
    fit_phase(
        head,
        ViewSampler(xe_tr, y_tr, args.batch_size, args.seed, weights, dup_w),
        (xe_va[:, 0].astype(np.float32), y_va),
        args.head_epochs,
        args.patience,
        "frozen-base",
        history,
    )

    # Phase 2: fine-tune the layers after the cut on the cached cut-layer activations.
    base.trainable = True
    first_tuned = args.finetune_from or first_layer_after(base, cache.cut_layer)
    names = [layer.name for layer in top.layers]
    if first_tuned not in names:
        raise ValueError(
            f"--finetune-from {first_tuned!r} is not above the cache's cut {cache.cut_layer!r}"
        )
    start = names.index(first_tuned)
    for i, layer in enumerate(top.layers):
        # Batch-norm layers stay in inference mode with their ImageNet statistics; layers
        # between the cache's cut and ``first_tuned`` stay frozen too.
        layer.trainable = i >= start and not isinstance(layer, keras.layers.BatchNormalization)
    top.compile(keras.optimizers.Adam(args.lr_fine), "binary_crossentropy", metrics=["accuracy"])

    def save_best() -> None:
        model.save(args.out / MODEL_FILE)

    save_best()
    fit_phase(
        top,
        ViewSampler(xf_tr, y_tr, args.batch_size, args.seed + 1, weights, dup_w),
        (xf_va[:, 0].astype(np.float32), y_va),
        args.epochs,
        args.patience,
        "fine-tune",
        history,
        on_best=save_best,
        reduce_lr_after=args.reduce_lr_after,
    )
    model.save(args.out / MODEL_FILE)
    train_seconds = time.time() - t_start

    p_va = top.predict(xf_va[:, 0].astype(np.float32), batch_size=256, verbose=0).ravel()
    parity = cache_parity(model, records, cache, sets["val"], p_va, labels_by_key, damaged)
    print(f"saved network vs cached path on val files: max |dp| = {parity:.5f}", flush=True)
    threshold = threshold_for_sensitivity(y_va, p_va, args.target_sensitivity)
    metrics = {"val": binary_metrics(y_va, p_va, threshold)}
    (args.out / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    manifests = {}
    for name, d in (
        ("bone-fracture-multi-region", args.bfmr_dir),
        ("fracatlas-train", args.fracatlas_dir),
    ):
        if d is not None:
            manifests[name] = file_sha256(Path(d) / "manifest.csv")
    card = ModelCard(
        name=args.name,
        version=args.version,
        uid=f"2.25.{uuid.uuid4().int}",
        threshold=round(float(threshold), 6),
        input_size=args.size,
        extra={
            "architecture": "MobileNetV2 (alpha 1.0, ImageNet) + global average pool + dropout "
            f"{args.dropout} + sigmoid; input 0..255 RGB, rescaled inside the network",
            "training": {
                "split_mode": args.split_mode,
                "split_file": args.split.name if args.split else None,
                "split_file_sha256": file_sha256(args.split) if args.split else None,
                "dataset_manifests_sha256": manifests,
                "weights_sha256": file_sha256(Path(args.weights)) if args.weights else None,
                "images": {"train": len(y_tr), "val": len(y_va), "test": len(y_te)},
                "fractured": {
                    "train": int(y_tr.sum()),
                    "val": int(y_va.sum()),
                    "test": int(y_te.sum()),
                },
                "views_per_image": int(xf_tr.shape[1]),
                "class_weights": weights,
                "duplicate_weighting_similarity": args.dedup_similarity,
                "seed": args.seed,
                "target_sensitivity": args.target_sensitivity,
                "epochs_run": len(history),
                "seconds_training": round(train_seconds, 1),
                "seconds_feature_cache": cache.meta.get("seconds"),
                "lr_fine": args.lr_fine,
                "reduce_lr_after": args.reduce_lr_after,
                "finetuned_from_layer": first_tuned,
                "cache_cut_layer": cache.cut_layer,
                "cache_parity_max_abs_diff": round(parity, 6),
            },
            "metrics": metrics,
        },
    )
    write_card(args.out, card)
    from model.training.export import export

    card = export(args.out)  # what the node loads: the network as LiteRT
    print(json.dumps({"threshold": card.threshold, "metrics": metrics}, indent=1))
    print(f"saved {args.out / MODEL_FILE} ({train_seconds:.0f}s)")
    return {"card": card, "history": history, "metrics": metrics}


def first_layer_after(base: Any, cut: str) -> str:
    """The first fine-tuned MobileNetV2 layer: the one after the cache's cut layer."""
    names = [layer.name for layer in base.layers]
    return names[names.index(cut) + 1]


def cache_parity(
    model: Any,
    records: Sequence[Record],
    cache: Cache,
    val_keys: Sequence[str],
    p_cached: np.ndarray,
    labels_by_key: dict[str, int],
    damaged: set[str],
    n: int = 16,
) -> float:
    """Largest probability difference between the whole saved network on files read through
    the shared preprocessing and the cached-activation path training used (float16 cache)."""
    from model.imaging import load_network_input

    # the order of ``p_cached``: validation keys by cache index, as ``arrays`` builds them
    keys = sorted(
        (k for k in val_keys if k in cache.index and k not in cache.rejected and k not in damaged),
        key=cache.index.__getitem__,
    )
    by_key = {r.key: r for r in records}
    pick = keys[:n]
    x = np.stack([load_network_input(by_key[k].path, cache.size) for k in pick])
    p_full = np.asarray(model(x.astype(np.float32), training=False)).ravel()
    return float(np.abs(p_full - p_cached[: len(pick)]).max()) if pick else 0.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    repo = Path(__file__).resolve().parents[2]
    shared = repo.parent / "shared"
    parser.add_argument(
        "--bfmr-dir", type=Path, default=shared / "datasets/bone-fracture-multi-region"
    )
    parser.add_argument("--fracatlas-dir", type=Path, default=shared / "datasets/fracatlas-train")
    parser.add_argument(
        "--weights",
        default=str(shared / "weights/mobilenet_v2_imagenet_1.0_224_no_top.h5"),
        help='ImageNet weights file, or "imagenet" where internet exists',
    )
    parser.add_argument("--split", type=Path, default=repo / "model/splits/split_v1.csv")
    parser.add_argument(
        "--split-mode", choices=("leakage-free", "original"), default="leakage-free"
    )
    parser.add_argument(
        "--cache", type=Path, default=None, help="feature cache (model.training.features)"
    )
    parser.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument(
        "--cut-layer",
        default=CUT_LAYER,
        help="when the cache is built here: last frozen layer (everything after it is tuned)",
    )
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--head-epochs", type=int, default=15)
    parser.add_argument("--patience", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr-head", type=float, default=1e-3)
    parser.add_argument("--lr-fine", type=float, default=1e-4)
    parser.add_argument(
        "--finetune-from",
        default=None,
        help="first fine-tuned layer (default: the one after the cache's cut layer)",
    )
    parser.add_argument(
        "--reduce-lr-after",
        type=int,
        default=0,
        help="fine-tuning: cut the learning rate to 30%% after N epochs without improvement",
    )
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--target-sensitivity", type=float, default=0.92)
    parser.add_argument(
        "--dedup-similarity",
        type=float,
        default=0.90,
        help="down-weight clusters of near-identical training images (cosine >= this; 1 = off)",
    )
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--limit", type=int, default=0, help="at most N images per split")
    parser.add_argument("--name", default="fracture-triage-mobilenetv2")
    parser.add_argument("--version", default=time.strftime("%Y%m%d"))


def main_args(args: argparse.Namespace) -> int:
    train(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the fracture classifier")
    add_arguments(parser)
    return main_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
