"""Combine classifiers trained with different seeds into one network: a seed ensemble.

``python -m model.experiments.ensemble --member RUN --member RUN ... --out DIR [--tta d4]``

Every member must come from the same feature cache (:mod:`model.training.features`): the layers
up to the cache's cut are frozen ImageNet layers, identical in every member, so the combined network
runs them once and then each member's fine-tuned top; its output is the mean of the members'
probabilities. The result is an ordinary artifact (one ``best_model.keras`` taking 0..255 RGB
images, one probability out), so the worker, ``classify`` and ``evaluate`` use it unchanged.
Its threshold is chosen on validation files through the shipped inference path, by the same
rule as training (:func:`model.training.threshold.rechoose`).

Averaging independently trained networks lowers the variance of the prediction: fine-tuning
on a few thousand radiographs lands in quite different minima from one seed to the next.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.artifact import MODEL_FILE, TEST_TIME_AUGMENTATIONS, ModelCard, read_card, write_card
from model.training.train import HISTORY_FILE

#: training settings every member must share for their average to be one model
SHARED_TRAINING = ("split_mode", "split_file_sha256", "cache_cut_layer", "target_sensitivity")


def base_network(model: Any) -> Any:
    """The MobileNetV2 sub-network inside a network from
    :func:`model.training.network.build_classifier`."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"expected one MobileNetV2 sub-network in {model.name}, got {len(nested)}")
    return nested[0]


def build_ensemble(models: Sequence[Any], cut: str) -> Any:
    """One network: the shared frozen layers up to ``cut`` once, then every member's top,
    then the mean probability.

    Raises ``ValueError`` when fewer than two members are given, one network is given twice, or
    their layers up to ``cut`` differ (members not trained from the same frozen base)."""
    if len(models) < 2:
        raise ValueError(f"an ensemble needs at least two members, got {len(models)}")
    if len({id(m) for m in models}) != len(models):
        # one layer object in two members is saved once and cannot be loaded back
        raise ValueError("each member must be its own network object (load it again)")
    import keras

    from model.training.features import split_network

    lowers, tops = [], []
    for i, model in enumerate(models):
        lower, (top, _) = split_network(model, base_network(model), cut)
        top.name = f"member_{i}"  # nested models need distinct names in one network
        lowers.append(lower)
        tops.append(top)
    reference = lowers[0].get_weights()
    for i, lower in enumerate(lowers[1:], start=1):
        weights = lower.get_weights()
        if len(weights) != len(reference) or any(
            a.shape != b.shape or not np.array_equal(a, b)
            for a, b in zip(reference, weights, strict=False)
        ):
            raise ValueError(
                f"member {i} differs from member 0 below {cut!r}: members must be trained from "
                "the same frozen base (one feature cache)"
            )
    image = keras.Input(shape=tuple(models[0].input.shape[1:]), name="image")
    features = lowers[0](image)
    probabilities = [top(features) for top in tops]
    mean = keras.layers.Average(name="fracture_probability")(probabilities)
    return keras.Model(image, mean, name="mobilenetv2_fracture_ensemble")


def _training(card: ModelCard) -> dict[str, Any]:
    """The card's training record; cards older than the ``cache_cut_layer`` field were all
    trained on caches cut at :data:`model.training.features.CUT_LAYER`."""
    from model.training.features import CUT_LAYER

    return {"cache_cut_layer": CUT_LAYER, **card.extra["training"]}


def combine(members: Sequence[Path], out: Path, version: str) -> ModelCard:
    """Write the ensemble artifact of ``members`` (artifact directories) to ``out``; the
    threshold is still the members' mean until :func:`model.training.threshold.rechoose` runs."""
    import keras

    cards = [read_card(m) for m in members]
    trainings = [_training(c) for c in cards]
    first = cards[0]
    for path, card in zip(members, cards, strict=True):
        if card.input_size != first.input_size:
            raise ValueError(f"{path}: input size {card.input_size}, not {first.input_size}")
    for path, training in zip(members, trainings, strict=True):
        for key in SHARED_TRAINING:
            if training.get(key) != trainings[0].get(key):
                raise ValueError(
                    f"{path}: training {key} {training.get(key)!r} differs from "
                    f"{members[0]}'s {trainings[0].get(key)!r}"
                )
    models = [keras.models.load_model(m / MODEL_FILE, compile=False) for m in members]
    network = build_ensemble(models, trainings[0]["cache_cut_layer"])
    out.mkdir(parents=True, exist_ok=True)
    network.save(out / MODEL_FILE)
    history = []
    for training, path in zip(trainings, members, strict=True):
        seed = training["seed"]
        for row in json.loads((path / HISTORY_FILE).read_text()):
            history.append({**row, "phase": f"seed {seed} {row['phase']}"})
    (out / HISTORY_FILE).write_text(json.dumps(history, indent=1) + "\n")
    training = {
        **trainings[0],
        "seed": [t["seed"] for t in trainings],
        "epochs_run": [t["epochs_run"] for t in trainings],
        # the feature cache is built once and shared; each member trains on it in turn
        "seconds_training": round(sum(t["seconds_training"] for t in trainings), 1),
    }
    card = ModelCard(
        name=first.name,
        version=version,
        uid=f"2.25.{uuid.uuid4().int}",
        threshold=round(float(np.mean([c.threshold for c in cards])), 6),
        input_size=first.input_size,
        extra={
            "architecture": f"mean of {len(cards)} networks sharing MobileNetV2's frozen layers "
            f"up to {training['cache_cut_layer']}, each: "
            + first.extra.get("architecture", "MobileNetV2"),
            "ensemble": {
                "combination": "mean probability",
                "members": [
                    {
                        "uid": c.uid,
                        "seed": t["seed"],
                        "val": c.extra.get("metrics", {}).get("val", {}),
                    }
                    for c, t in zip(cards, trainings, strict=True)
                ],
            },
            "training": training,
            "metrics": {},
        },
    )
    write_card(out, card)
    return card  # its export is made by the threshold step (model.training.threshold.rechoose)


def main(argv: Sequence[str] | None = None) -> int:
    from model.training.threshold import add_data_arguments, rechoose

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--member", type=Path, action="append", required=True, help="artifact dir")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--version", required=True)
    p.add_argument("--tta", choices=TEST_TIME_AUGMENTATIONS, default="none")
    add_data_arguments(p)
    args = p.parse_args(argv)
    card = combine(args.member, args.out, args.version)
    print(f"wrote {args.out / MODEL_FILE}: {len(args.member)} members, uid {card.uid}", flush=True)
    result = rechoose(
        args.out, args.bfmr_dir, args.fracatlas_dir, args.split, args.split_mode, args.tta
    )
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
