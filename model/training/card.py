"""Finish a model artifact: both figures side by side in ``model_card.json`` and ``model_card.md``.

``python -m model.training.card --artifact DIR --honest-eval DIR (--original-eval DIR
--original-artifact DIR | --notebook-from EARLIER_ARTIFACT) --audit AUDIT.json
[--size-probe JSON] [--throughput JSON]``

The two figures are always reported together: (1) notebook-comparable, a model trained on the
bone fracture set's original train split and tested on its original (leaky) test split;
(2) honest, the shipped model on the leakage-free test split (:mod:`model.training.split`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from model.artifact import ModelCard, read_card, write_card
from model.training.data import SOURCE_DIRECTORIES, source_of_path
from model.training.metrics import binary_metrics
from model.training.plots import history_plot

ROWS = ("n", "accuracy", "auroc", "sensitivity", "specificity", "precision", "f1")


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
    keep = (*ROWS, "positives", "threshold", "confusion_matrix")
    out = {k: report[k] for k in keep if k in report} | {
        "unreadable_files": len(report.get("errors", []))
    }
    preds = report.get("predictions", [])
    by_source: dict[str, Any] = {}
    for source, _ in SOURCE_DIRECTORIES:
        rows = [r for r in preds if source_of_path(r["file"]) == source]
        if rows:
            y = np.array([r["label"] for r in rows])
            p = np.array([r["probability"] for r in rows])
            m = binary_metrics(y, p, report["threshold"])
            by_source[source] = {k: m[k] for k in (*ROWS, "positives")}
    if by_source:
        out["by_source"] = by_source
    return out


def notebook_figure_from(previous: Path, artifact: Path) -> dict[str, Any]:
    """The notebook-comparable figure of an earlier artifact's card (with its plots copied),
    for a version whose recipe was not re-run on the original split; the card says so."""
    prev = read_card(previous)
    for name in ("roc_original.png", "confusion_matrix_original.png",
                 "training_curves_original.png"):  # fmt: skip
        if (previous / name).is_file():
            shutil.copy(previous / name, artifact / name)
    model = dict(prev.extra["notebook_comparable_model"])
    model["note"] = (
        f"carried from version {prev.version}'s card: its recipe trained on the original "
        "train split (bone fracture set); not re-run with this version's recipe"
    )
    return {
        "metrics": prev.extra["metrics"]["original_test_notebook_comparable"],
        "model": model,
    }


def finish(
    artifact: Path,
    honest_eval: Path,
    original_eval: Path | None,
    original_artifact: Path | None,
    audit: Path,
    size_probe: Path | None,
    throughput: Path | None,
    notebook_from: Path | None = None,
) -> ModelCard:
    card = read_card(artifact)
    honest = json.loads((honest_eval / "evaluation.json").read_text())
    audit_data = json.loads(audit.read_text())
    plots = {}
    carried = None
    sources = [(honest_eval, "leakage_free")]
    if original_eval is not None and original_artifact is not None:
        sources.append((original_eval, "original"))
    elif notebook_from is not None:
        carried = notebook_figure_from(notebook_from, artifact)
        for name in ("roc_original", "confusion_matrix_original", "training_curves_original"):
            if (artifact / f"{name}.png").is_file():
                plots[name] = f"{name}.png"
    else:
        raise ValueError("the notebook-comparable figure needs --original-eval and "
                         "--original-artifact, or --notebook-from")  # fmt: skip
    for src_dir, tag in sources:
        for name in ("roc", "confusion_matrix"):
            src = src_dir / f"{name}.png"
            if src.is_file():
                dst = artifact / f"{name}_{tag}.png"
                shutil.copy(src, dst)
                plots[f"{name}_{tag}"] = dst.name
    history = json.loads((artifact / "history.json").read_text())
    plots["training_curves"] = history_plot(
        history, artifact / "training_curves.png", f"{card.name} {card.version}"
    ).name
    orig_history = original_artifact / "history.json" if original_artifact else None
    if orig_history is not None and orig_history.is_file():
        shutil.copy(orig_history, artifact / "history_original_split.json")
        plots["training_curves_original"] = history_plot(
            json.loads(orig_history.read_text()),
            artifact / "training_curves_original.png",
            "notebook-comparable run (original train split)",
        ).name
    extra = dict(card.extra)
    previous = extra.get("metrics", {})
    if carried is None:
        assert original_eval is not None and original_artifact is not None
        original_metrics = _metrics(json.loads((original_eval / "evaluation.json").read_text()))
        original_card = read_card(original_artifact)
        notebook_model = {
            "note": "a separate model, same pipeline, trained on the original train split only "
            "(bone fracture set); its weights are not shipped",
            "uid": original_card.uid,
            "threshold": original_card.threshold,
            "training": original_card.extra.get("training"),
        }
    else:
        original_metrics, notebook_model = carried["metrics"], carried["model"]
    extra["metrics"] = {
        "leakage_free_test": _metrics(honest),
        "original_test_notebook_comparable": original_metrics,
        # "val" as training / model.training.threshold write it; "validation" when finishing again
        "validation": previous.get("val") or previous.get("validation"),
        "notebook_reported_original_test_accuracy": 0.96,
    }
    extra["notebook_comparable_model"] = notebook_model
    extra["leakage_audit"] = {
        k: audit_data[k]
        for k in (
            "split_file",
            "split_file_sha256",
            "method",
            "threshold_bits",
            "min_similarity",
            "groups",
            "groups_per_split",
            "images_per_split_and_label",
            "excluded",
            "original_split",
            "audit",
        )
    }
    if size_probe is not None and size_probe.is_file():
        extra["input_size_probe"] = json.loads(size_probe.read_text())
    if throughput is not None and throughput.is_file():
        extra["classify_throughput"] = json.loads(throughput.read_text())
    extra["plots"] = plots
    new = ModelCard(**{**card.__dict__, "extra": extra})
    write_card(artifact, new)
    (artifact / "model_card.md").write_text(markdown(new))
    return new


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


EXPORT_HEADING = "## Inference export (what the node loads)"


def export_section(card: ModelCard) -> list[str]:
    """The card's export section (markdown lines, starting with a blank line); empty
    without an export record."""
    e = card.export
    if e is None:
        return []
    lines = [
        "",
        EXPORT_HEADING,
        "",
        f"- `{e.file}` ({e.format}), sha256 `{e.sha256}`: made from `best_model.keras` by "
        f"`python -m model.training.export`; input {e.input_size} px, test-time augmentation "
        f"`{e.test_time_augmentation}` inside the graph (for d4: one batch of 8 views).",
        f"- Largest |export - Keras| probability over {e.checked_files} files: "
        + (f"{e.max_abs_difference:.2g}" if e.max_abs_difference is not None else "not checked"),
    ]
    if e.class_activation_map:
        lines.append(
            "- Returns the class activation map beside the probability (last feature maps "
            "weighted by the dense unit, each view's map turned back to the image's "
            "orientation, then averaged); largest |export - Keras| map value: "
            + (
                f"{e.max_abs_map_difference:.2g}"
                if e.max_abs_map_difference is not None
                else "not checked"
            )
        )
    return lines


def refresh_export_section(model_dir: Path, card: ModelCard) -> None:
    """Rewrite the export section of ``model_dir/model_card.md`` from ``card`` (after an
    export), leaving the rest of the page as it is; nothing when there is no page."""
    path = Path(model_dir) / "model_card.md"
    if not path.is_file():
        return
    lines = path.read_text().split("\n")
    if EXPORT_HEADING in lines:
        start = lines.index(EXPORT_HEADING) - 1  # the blank line before it
        end = next(
            (i for i in range(start + 2, len(lines)) if lines[i].startswith("## ")),
            len(lines),
        )
        end -= 1  # keep the blank line before the next heading
        lines[start:end] = export_section(card)
    path.write_text("\n".join(lines))


def markdown(card: ModelCard) -> str:
    x = card.extra
    m = x["metrics"]
    hon, orig = m["leakage_free_test"], m["original_test_notebook_comparable"]
    tr = x["training"]
    audit = x["leakage_audit"]
    lines = [
        f"# Model card: {card.name} {card.version}",
        "",
        f"- UID (Device UID in the SR): `{card.uid}` (new whenever the answers change: "
        "retraining, threshold or test-time augmentation)",
        f"- Input: {card.input_size} x {card.input_size} RGB, 0..255 (rescaled inside the "
        "network); any DICOM or picture goes through `model.imaging.load_network_input`.",
        *operating_lines(card),
        f"- Architecture: {x['architecture']}",
        f"- Test-time augmentation: {card.test_time_augmentation}"
        + (
            " (each image's probability is the mean over its 8 rotations by 90 degrees and "
            "mirror images; the threshold was chosen with it)"
            if card.test_time_augmentation == "d4"
            else ""
        ),
        "- Intended use: triage aid that flags radiographs for a radiologist's attention. "
        "Not a diagnosis; a negative result does not rule out a fracture.",
        "",
        "## Two figures, side by side",
        "",
        "| | (1) notebook-comparable: original test split | (2) honest: leakage-free test split |",
        "|---|---|---|",
    ]
    for key in ROWS:
        lines.append(f"| {key} | {_fmt(orig.get(key))} | {_fmt(hon.get(key))} |")
    lines += [
        f"| confusion [[tn, fp], [fn, tp]] | {orig['confusion_matrix']['matrix']} | "
        f"{hon['confusion_matrix']['matrix']} |",
        f"| unreadable files (left out) | {orig['unreadable_files']} | {hon['unreadable_files']} |",
        f"| model | trained on the original train split (threshold "
        f"{x['notebook_comparable_model']['threshold']:.4f}) | this model (threshold "
        f"{card.threshold:.4f}) |",
        "",
        f"The notebook reported {m['notebook_reported_original_test_accuracy']} accuracy on the "
        "original test split. That split leaks: "
        f"{audit['original_split']['test_images_with_near_duplicate_in_original_train']} of "
        f"{audit['original_split']['distinct_test_images']} distinct original test images have "
        "an exact or near-duplicate in the original train split, so figure (1) measures "
        "memorisation. Figure (2) is the one to trust.",
        "",
        f"By source on the leakage-free test split: {json.dumps(hon.get('by_source'))}",
        "",
        *(
            [f"Validation (threshold chosen here): {json.dumps(m['validation'])}", ""]
            if m.get("validation")
            else []
        ),
        "| | original split | leakage-free split |",
        "|---|---|---|",
        "| ROC | ![](roc_original.png) | ![](roc_leakage_free.png) |",
        "| confusion matrix | ![](confusion_matrix_original.png) | "
        "![](confusion_matrix_leakage_free.png) |",
        "| training curves | ![](training_curves_original.png) | ![](training_curves.png) |",
        "",
        "## Data and split",
        "",
        f"- Dataset manifests (sha256): {json.dumps(tr['dataset_manifests_sha256'])}",
        f"- Split file `model/splits/{audit['split_file']}` sha256 `{audit['split_file_sha256']}`",
        f"- Leakage audit: {audit['method']}; pHash threshold {audit['threshold_bits']} bits, "
        f"embedding similarity >= {audit['min_similarity']}.",
        f"- {audit['groups']} groups; per split {audit['groups_per_split']}; images "
        f"{audit['images_per_split_and_label']}",
        f"- Test images with a near-duplicate in train: "
        f"{audit['audit']['test_images_with_near_duplicate_in_train']}; groups on two sides: "
        f"{audit['audit']['groups_on_two_sides']}; FracAtlas ids shared by test and train: "
        f"{audit['audit']['test_fracatlas_ids_also_in_train']}.",
        f"- Excluded damaged files: {len(audit['excluded'])} ("
        + ", ".join(k.split(":")[1][:12] for k in audit["excluded"])
        + ")",
        "",
        *training_lines(tr),
    ]
    if "operating_point" in x:
        lines += operating_point_section(x["operating_point"])
    lines += [
        *([] if "recipe" in tr else ["", "## Training", ""]),
        *([] if "recipe" in tr else old_training_lines(tr)),
    ]
    lines += ["", "## Model selection", "", x["model_selection"]] if "model_selection" in x else []
    return _tail(card, x, lines)


def old_training_lines(tr: dict[str, Any]) -> list[str]:
    """The cached-activation recipe of versions 1.x."""
    return [
        f"- Images: {tr['images']} (fractured {tr['fractured']}); {tr['views_per_image']} "
        "cached views per image (view 0 = inference input; others = random rotation by 90 "
        "degrees / flip + zoom 80-100 %, shift, contrast and brightness).",
        "- Phase 1: MobileNetV2 frozen, head trained on pooled features. Phase 2: every "
        f"MobileNetV2 layer from `{tr.get('finetuned_from_layer')}` up, and the head, "
        "fine-tuned (batch norm frozen) on the cached activations of the layer below it.",
        f"- Class weights {tr['class_weights']}; near-duplicate clusters (embedding cosine >= "
        f"{tr.get('duplicate_weighting_similarity')}) down-weighted by 1/sqrt(size); seed "
        f"{tr['seed']}; epochs run {tr['epochs_run']} (early stopping on validation loss, best "
        "epoch restored).",
        f"- Time on this 2-core CPU: feature cache {tr['seconds_feature_cache']} s "
        f"(shared by both runs), training {tr['seconds_training']} s.",
        f"- Saved network vs cached training path (val files): max |dp| = "
        f"{tr.get('cache_parity_max_abs_diff')}",
    ]


def operating_lines(card: ModelCard) -> list[str]:
    """The threshold lines: one threshold (1.x), or the two of the three levels."""
    upper = card.upper_threshold
    op = card.extra.get("operating_point")
    if upper is None or op is None:
        target = card.extra["training"]["target_sensitivity"]
        return [
            f"- Operating threshold: **{card.threshold:.4f}** (chosen on validation data for "
            f"sensitivity >= {target})"
        ]
    return [
        f"- Three levels: **fracture** at p >= {upper:.4f}, **doubt** at {card.threshold:.4f} "
        f"<= p < {upper:.4f}, **no fracture** below {card.threshold:.4f} (both chosen on "
        "validation data; see Operating point)",
    ]


def operating_point_section(op: dict[str, Any]) -> list[str]:
    rows = ["n", "sensitivity", "specificity", "precision"]
    lines = [
        "",
        "## Operating point (validation split)",
        "",
        f"Rule: {op['rule']}; {op['n_boot']} bootstrap resamples, one-sided "
        f"{op['confidence']:.0%} bounds; targets sensitivity >= {op['target_sensitivity']} on "
        f"each source, PPV >= {op['target_ppv']}"
        + ("" if op.get("upper_target_reached", True) else " (PPV target not reached)")
        + ".",
        "",
        f"Lower threshold each source's bound allows: {op['lower_threshold_allowed_by_source']}; "
        f"PPV lower bound at the upper threshold: {op['upper_ppv_lower_bound']}; levels on "
        f"validation: {op['levels_on_val']}.",
        "",
        "| validation | " + " | ".join(f"{r} (lower / upper)" for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for src in op["at_lower"]:
        lo, up = op["at_lower"][src], op["at_upper"][src]
        lines.append(
            f"| {src} | " + " | ".join(f"{_fmt(lo[r])} / {_fmt(up[r])}" for r in rows) + " |"
        )
    return lines


def training_lines(tr: dict[str, Any]) -> list[str]:
    """The end-to-end recipe (2.x); nothing for cards of the cached-activation recipe."""
    if "recipe" not in tr:
        return []
    return [
        "## Training",
        "",
        f"- Recipe: {tr['recipe']}. Images: {tr['images']} (fractured {tr['fractured']}); "
        f"{tr['rejected_files']} damaged files left out.",
        f"- Warm-up: {tr['warmup_epochs']} epochs of the head on the frozen ImageNet base (Adam "
        f"{tr['lr_head']}); then every convolution trained end to end (AdamW {tr['lr_fine']}, "
        f"weight decay {tr['weight_decay']}, {tr['lr_schedule']}), batch norm "
        f"{tr['batch_norm']}; batch {tr['batch_size']}, seed {tr['seed']}.",
        f"- Augmentation drawn anew per image and epoch: {json.dumps(tr['augmentation'])}.",
        f"- Class weights {tr['class_weights']}; epochs run {tr['epochs_run']} (early stopping "
        f"on validation loss, patience {tr['patience']}, best epoch kept: val loss "
        f"{tr['best_val_loss']}); single-view validation AUROC {tr['val_auroc_single_view']}.",
        f"- Time on this 2-core CPU: decoding cache {tr['seconds_image_cache']} s, training "
        f"{tr['seconds_training']} s.",
    ]


def _tail(card: ModelCard, x: dict[str, Any], lines: list[str]) -> str:
    if "input_size_probe" in x:
        lines += [
            "",
            "## Input size",
            "",
            f"```\n{json.dumps(x['input_size_probe'], indent=1)}\n```",
        ]
    if "classify_throughput" in x:
        lines += [
            "",
            "## Throughput (CPU)",
            "",
            f"```\n{json.dumps(x['classify_throughput'], indent=1)}\n```",
        ]
    lines += export_section(card)
    steps = REPRODUCE_END_TO_END if "recipe" in x["training"] else REPRODUCE
    lines += ["", "## Reproduce", "", "```sh", *steps, "```"]
    lines += [
        "",
        "## Limitations",
        "",
        "- Trained on two public sets (Bone Fracture Multi-Region, FracAtlas); performance on "
        "other hospitals' radiographs is not measured here.",
        "- The bone fracture set is mostly 224 px JPEG re-exports; subtle fractures in full "
        "resolution DICOMs are seen at 224 px only.",
        "",
    ]
    return "\n".join(lines)


#: The commands that produced the shipped artifact (repository root, ../shared beside it).
REPRODUCE = [
    "python -m model.training.features --views 4 --out CACHE"
    "   # frozen lower network, cut after block 13",
    "python -m model.training.split --cache CACHE --hash-cache CACHE/hashes.npz"
    "   # model/splits/split_v1.*",
    "python -m model.training.train --cache CACHE --out RUN --dedup-similarity 0.90"
    "   # shipped weights",
    "python -m model.training.threshold --model RUN --tta d4"
    "   # D4 averaging; threshold on val files",
    "python -m model.training.export --model RUN --check-split val"
    "   # the LiteRT export, compared with Keras",
    "python -m model.training.train --split-mode original --cache CACHE --out ORIG --epochs 12",
    "python -m model.training.threshold --model ORIG --split-mode original --tta d4",
    "python -m model.training.manifests --out-dir EVAL"
    "     # original_test.csv, leakage_free_test.csv",
    "fracture-triage evaluate --model RUN --manifest EVAL/leakage_free_test.csv --out OUT_HONEST",
    "fracture-triage evaluate --model ORIG --manifest EVAL/original_test.csv --out OUT_ORIGINAL",
    "python -m model.experiments.size_probe --cache CACHE --size 320 --n-train 1000",
    "python -m model.benchmark -n 64",
    "# fine-tuning depth and views (compared on validation, not shipped):",
    "python -m model.training.features --views 8 --cut-layer block_5_add --out CACHE8",
    "python -m model.training.train --cache CACHE8 --out DEEP --reduce-lr-after 2 --patience 5",
    "python -m model.training.train --cache CACHE8 --finetune-from block_14_expand --out VIEWS8 "
    "--reduce-lr-after 2 --patience 5",
    "# seed ensembles (compared on validation, then tested; not shipped), S in 1235..1238:",
    "python -m model.training.train --cache CACHE --out SEED_S --dedup-similarity 0.90 --seed S",
    "python -m model.experiments.ensemble --member RUN --member SEED_1235 ... --member SEED_1238 "
    "--out ENS5 --version 1.2.0 --tta d4",
    "python -m model.training.train --cache CACHE --out LOW_S --dedup-similarity 0.90 --seed S "
    "--lr-fine 3e-5 --reduce-lr-after 2 --patience 5   # S in 1235..1237",
    "python -m model.experiments.ensemble --member LOW_1235 --member LOW_1236 --member LOW_1237 "
    "--out ENS3 --version 1.2.0 --tta d4",
    "fracture-triage evaluate --model ENS5 --manifest EVAL/leakage_free_test.csv --out OUT_ENS5",
    "python -m model.experiments.compare OUT_HONEST/evaluation.json OUT_ENS5/evaluation.json"
    "   # paired CI",
    "# input 320 against 224 with recipe LOW_S (compared on validation, then tested; not shipped):",
    "python -m model.training.features --size 320 --views 4 --out CACHE320",
    "python -m model.training.train --cache CACHE320 --size 320 --out S320_S "
    "--dedup-similarity 0.90 --seed S --lr-fine 3e-5 --reduce-lr-after 2 --patience 5"
    "   # S in 1235, 1236",
    "fracture-triage evaluate --model S320_S --manifest EVAL/leakage_free_val.csv --out V320_S",
    "fracture-triage evaluate --model LOW_S --manifest EVAL/leakage_free_val.csv --out V224_S",
    "python -m model.experiments.compare V224_S/evaluation.json V320_S/evaluation.json"
    "   # also by source",
    "python -m model.training.threshold --model S320_1235 --tta d4"
    "   # the candidate; then test as above",
]


#: The commands that produced an end-to-end (2.x) artifact.
REPRODUCE_END_TO_END = [
    "python -m model.training.finetune --out RUN --image-cache CACHE224 --version V --seed S"
    "   # warm-up + end to end; exports at the end",
    "python -m model.training.export --model RUN --check-split val   # LiteRT + CAM, vs Keras",
    "python -m model.training.operating_point --model RUN   # both thresholds on val files",
    "python -m model.training.selection --incumbent model/artifacts/1.1.0 --candidate RUN"
    "   # the rule; test once per candidate",
    "python -m model.training.manifests --out-dir EVAL",
    "fracture-triage evaluate --model RUN --manifest EVAL/leakage_free_test.csv --out OUT_HONEST",
    "python -m model.training.card --artifact RUN --honest-eval OUT_HONEST "
    "--notebook-from model/artifacts/1.1.0 --audit AUDIT.json --selection-note ...",
    "python -m model.benchmark -n 64",
]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--honest-eval", type=Path, required=True)
    p.add_argument("--original-eval", type=Path, default=None)
    p.add_argument("--original-artifact", type=Path, default=None)
    p.add_argument(
        "--notebook-from",
        type=Path,
        default=None,
        help="carry the notebook-comparable figure from this earlier artifact's card instead",
    )
    p.add_argument("--audit", type=Path, required=True)
    p.add_argument("--size-probe", type=Path, default=None)
    p.add_argument("--throughput", type=Path, default=None)
    p.add_argument("--selection-note", default=None, help="how this run was chosen (val only)")
    a = p.parse_args(argv)
    if a.selection_note:
        c = read_card(a.artifact)
        write_card(
            a.artifact,
            ModelCard(**{**c.__dict__, "extra": {**c.extra, "model_selection": a.selection_note}}),
        )
    card = finish(
        a.artifact,
        a.honest_eval,
        a.original_eval,
        a.original_artifact,
        a.audit,
        a.size_probe,
        a.throughput,
        a.notebook_from,
    )
    print(json.dumps(card.extra["metrics"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
