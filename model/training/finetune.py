"""End-to-end fine-tuning of the whole MobileNetV2 (model 2.0's recipe).

``python -m model.training.finetune --out DIR [--size 224] [--seed S]``

1. Every image is decoded once through the node's own preprocessing
   (:mod:`model.training.images`); a ``tf.data`` pipeline then draws fresh augmentation for every
   image in every epoch (:mod:`model.training.augment`), batched and prefetched so that both
   cores stay on the network.
2. *Warm-up*: the ImageNet base frozen, the sigmoid head trained for ``--warmup-epochs``, so the
   randomly initialised head does not send large gradients into the pretrained base.
3. *End to end*: every convolution trainable at a low learning rate (cosine decay). Batch
   normalisation is handled deliberately: its layers stay in inference mode with their ImageNet
   statistics (``trainable = False`` makes Keras 3 run them so), because batch statistics of 32
   radiographs are noisy and differ from the moving averages used at inference; training only
   the convolutions keeps training and inference computing the same function.

Class weights balance the labels. Each epoch is validated on the exact network input of every
validation image (no augmentation); early stopping on validation loss keeps the best epoch
(``--patience``). The artifact directory then gets ``best_model.keras``, ``history.json`` and a
card, and is exported (:mod:`model.training.export`); thresholds are chosen afterwards through
the export (:mod:`model.training.operating_point`).
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
from model.training.augment import AugmentConfig, augment_batch
from model.training.data import read_all
from model.training.images import Split, load_or_build
from model.training.train import HISTORY_FILE, add_arguments, class_weights, select


def dataset(split: Split, size: int, batch: int, seed: int, cfg: AugmentConfig) -> Any:
    """Training batches: shuffled anew each epoch, augmented per image with a stateless seed
    drawn from (seed, epoch, step), class-weighted; decoded pictures come from memory."""
    import tensorflow as tf

    w = class_weights(split.labels)
    weights = np.array([w[0], w[1]], np.float32)[split.labels]
    ds = tf.data.Dataset.from_tensor_slices(
        (split.images, split.labels.astype(np.float32), weights)
    )
    ds = ds.shuffle(len(split.labels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch, drop_remainder=False)
    counter = tf.data.Dataset.counter()  # a distinct augmentation seed for every batch
    ds = tf.data.Dataset.zip((ds, counter))

    def aug(batch_: Any, step: Any) -> Any:
        (x, y, sw) = batch_
        seeds = tf.stack([tf.constant(seed, tf.int64), step])
        return augment_batch(x, size, seeds, cfg), y, sw

    return ds.map(aug, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def val_inputs(split: Split) -> np.ndarray:
    return np.repeat(split.images[..., np.newaxis], 3, axis=-1).astype(np.float32)


def auroc_by_source(split: Split, p: np.ndarray) -> dict[str, float | None]:
    from sklearn.metrics import roc_auc_score

    out: dict[str, float | None] = {}
    src = np.array(split.sources)
    for name in ("all", *sorted(set(split.sources))):
        m = np.ones(len(src), bool) if name == "all" else src == name
        y = split.labels[m]
        ok = y.any() and (~y.astype(bool)).any()
        out[name] = round(float(roc_auc_score(y, p[m])), 4) if ok else None
    return out


class Trainer:
    """The two phases with validation, early stopping and the best weights kept."""

    def __init__(self, model: Any, val: Split, out: Path, patience: int) -> None:
        self.model, self.val, self.out, self.patience = model, val, out, patience
        self.x_val = val_inputs(val)
        self.history: list[dict[str, Any]] = []
        self.best = float("inf")

    def validate(self) -> tuple[float, np.ndarray]:
        p = self.model.predict(self.x_val, batch_size=64, verbose=0).ravel()
        y = self.val.labels.astype(np.float64)
        q = np.clip(p.astype(np.float64), 1e-7, 1 - 1e-7)
        loss = float(-np.mean(y * np.log(q) + (1 - y) * np.log(1 - q)))
        return loss, p

    def run(self, train_ds: Any, epochs: int, phase: str, steps: int) -> None:
        import keras

        waited = 0
        for epoch in range(epochs):
            t0 = time.time()
            bar = keras.utils.Progbar(steps, stateful_metrics=["loss"], unit_name="batch")
            losses = []
            for x, y, sw in train_ds:
                logs = self.model.train_on_batch(x, y, sample_weight=sw, return_dict=True)
                losses.append(float(logs["loss"]))
                bar.add(1, values=[("loss", losses[-1])])
            val_loss, p = self.validate()
            row = {
                "phase": phase,
                "epoch": epoch + 1,
                "loss": float(np.mean(losses)),
                "val_loss": val_loss,
                "val_auroc": auroc_by_source(self.val, p),
                "seconds": round(time.time() - t0, 1),
            }
            self.history.append(row)
            improved = val_loss < self.best - 1e-4
            print(
                f"[{phase}] epoch {epoch + 1}/{epochs} loss {row['loss']:.4f} "
                f"val_loss {val_loss:.4f} val_auroc {row['val_auroc']} ({row['seconds']} s)"
                + (" *" if improved else ""),
                flush=True,
            )
            (self.out / HISTORY_FILE).write_text(json.dumps(self.history, indent=1) + "\n")
            if improved:
                self.best, waited = val_loss, 0
                self.model.save(self.out / MODEL_FILE)
            else:
                waited += 1
                if waited >= self.patience:
                    print(f"[{phase}] early stop: no val_loss improvement for {waited} epochs")
                    break


def train(args: argparse.Namespace) -> dict[str, Any]:
    t_start = time.time()
    records = read_all(args.bfmr_dir, args.fracatlas_dir)
    keys = select(records, args.split_mode, args.split)
    by_key = {r.key: r for r in records}
    sets = {name: [by_key[k] for k in sorted(ks)] for name, ks in keys.items()}
    if args.limit:
        rng = np.random.default_rng(args.seed)
        sets = {
            k: [v[i] for i in sorted(rng.permutation(len(v))[: args.limit])]
            for k, v in sets.items()
        }
    manifests = {
        name: file_sha256(Path(d) / "manifest.csv")
        for name, d in (
            ("bone-fracture-multi-region", args.bfmr_dir),
            ("fracatlas-train", args.fracatlas_dir),
        )
        if d is not None
    }
    fingerprint = {
        "manifests": manifests,
        "split": file_sha256(args.split) if args.split else None,
        "split_mode": args.split_mode,
        "limit": args.limit,
    }
    cache_dir = args.image_cache or (args.out / "image-cache")
    splits, rejected = load_or_build(cache_dir, sets, args.size, args.margin, fingerprint)
    t_cache = time.time() - t_start
    train_s, val_s, test_s = splits["train"], splits["val"], splits["test"]
    print(
        f"train {len(train_s.labels)} ({int(train_s.labels.sum())} fractured), "
        f"val {len(val_s.labels)} ({int(val_s.labels.sum())}), test {len(test_s.labels)}; "
        f"{len(rejected)} rejected; input {args.size}, train pictures "
        f"{train_s.images.shape[1]} px ({t_cache:.0f} s)",
        flush=True,
    )

    import keras

    from model.training.network import build_classifier

    keras.utils.set_random_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    model, base = build_classifier(args.size, weights=args.weights, dropout=args.dropout)
    cfg = AugmentConfig(max_degrees=args.max_degrees, min_zoom=args.min_zoom)
    steps = -(-len(train_s.labels) // args.batch_size)
    trainer = Trainer(model, val_s, args.out, args.patience)

    # Phase 1: warm-up of the head on the frozen base.
    base.trainable = False
    model.compile(keras.optimizers.Adam(args.lr_head), "binary_crossentropy")
    t_train = time.time()
    trainer.run(
        dataset(train_s, args.size, args.batch_size, args.seed, cfg),
        args.warmup_epochs,
        "warm-up",
        steps,
    )
    # Phase 2: every convolution; batch norm frozen in inference mode (see the module doc).
    model = keras.models.load_model(args.out / MODEL_FILE)
    trainer.model = model
    base = model.get_layer(base.name)
    base.trainable = True
    for layer in base.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    schedule = keras.optimizers.schedules.CosineDecay(
        args.lr_fine, decay_steps=max(1, steps * args.epochs), alpha=0.05
    )
    model.compile(
        keras.optimizers.AdamW(schedule, weight_decay=args.weight_decay), "binary_crossentropy"
    )
    trainer.run(
        dataset(train_s, args.size, args.batch_size, args.seed + 1, cfg),
        args.epochs,
        "end-to-end",
        steps,
    )
    seconds_training = time.time() - t_train
    best = keras.models.load_model(args.out / MODEL_FILE)
    p_val = best.predict(trainer.x_val, batch_size=64, verbose=0).ravel()
    card = ModelCard(
        name=args.name,
        version=args.version,
        uid=f"2.25.{uuid.uuid4().int}",
        threshold=0.5,  # replaced by model.training.operating_point through the export
        input_size=args.size,
        # trained on all eight D4 views, so the node averages over them (in the export)
        test_time_augmentation="d4",
        extra={
            "architecture": "MobileNetV2 (alpha 1.0, ImageNet) + global average pool + dropout "
            f"{args.dropout} + sigmoid; input 0..255 RGB, rescaled inside the network",
            "training": {
                "recipe": "end-to-end fine-tuning (model.training.finetune)",
                "split_mode": args.split_mode,
                "split_file": args.split.name if args.split else None,
                "split_file_sha256": fingerprint["split"],
                "dataset_manifests_sha256": manifests,
                "weights_sha256": file_sha256(Path(args.weights)) if args.weights else None,
                "images": {k: len(v.labels) for k, v in splits.items()},
                "fractured": {k: int(v.labels.sum()) for k, v in splits.items()},
                "rejected_files": len(rejected),
                "class_weights": class_weights(train_s.labels),
                "seed": args.seed,
                "batch_size": args.batch_size,
                "warmup_epochs": args.warmup_epochs,
                "lr_head": args.lr_head,
                "lr_fine": args.lr_fine,
                "weight_decay": args.weight_decay,
                "lr_schedule": "cosine decay to 5 % over --epochs",
                "batch_norm": "frozen (inference mode, ImageNet statistics)",
                "augmentation": {**cfg.__dict__, "d4": True, "train_picture_margin": args.margin},
                "epochs_run": len(trainer.history),
                "patience": args.patience,
                "best_val_loss": round(trainer.best, 4),
                "val_auroc_single_view": auroc_by_source(val_s, p_val),
                "seconds_image_cache": round(t_cache, 1),
                "seconds_training": round(seconds_training, 1),
                "target_sensitivity": args.target_sensitivity,
            },
        },
    )
    write_card(args.out, card)
    print(
        json.dumps({"val_auroc_single_view": card.extra["training"]["val_auroc_single_view"]}),
        flush=True,
    )
    print(f"saved {args.out / MODEL_FILE} ({seconds_training:.0f} s training)", flush=True)
    if not args.no_export:
        from model.training.export import export

        export(args.out)
    return {"card": card, "history": trainer.history}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="End-to-end fine-tuning of MobileNetV2")
    add_arguments(parser)
    parser.set_defaults(epochs=12, batch_size=32, lr_fine=1e-4, patience=3)
    parser.add_argument("--warmup-epochs", type=int, default=2)
    parser.add_argument("--weight-decay", type=float, default=1e-5)
    parser.add_argument("--margin", type=float, default=1.25, help="train pictures at margin*size")
    parser.add_argument("--max-degrees", type=float, default=15.0)
    parser.add_argument("--min-zoom", type=float, default=0.75)
    parser.add_argument("--image-cache", type=Path, default=None)
    parser.add_argument("--no-export", action="store_true")
    train(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
