"""The model's subcommands of ``fracture-triage``: ``classify``, ``train``, ``evaluate``.

``fracture_triage.cli`` calls :func:`add_commands`. ``classify`` needs only the node's runtime
(the LiteRT export); ``train`` and ``evaluate`` need the ``[train]`` extra and, without it,
exit 2 saying which extra to install. Every handler takes ``(args, settings)`` and returns the
exit status, like the node's own commands.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

#: What each development command imports beyond the node's runtime (the ``[train]`` extra).
EXTRA_MODULES = {
    "train": ("tensorflow", "sklearn", "matplotlib"),
    "evaluate": ("sklearn", "matplotlib"),
}
INSTALL_HINT = "pip install 'fracture-triage[train]'"


def add_commands(subparsers: Any) -> None:
    """Register ``classify``, ``train`` and ``evaluate`` on an argparse subparsers object."""
    from model.training import evaluate, train

    p = subparsers.add_parser("classify", help="classify DICOM or picture files and folders")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--model", type=Path, default=None, help="artifact dir (default: shipped)")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.set_defaults(handler=classify)

    p = subparsers.add_parser(
        "train", help="train the fracture classifier, write an artifact (needs [train])"
    )
    train.add_arguments(p)
    p.set_defaults(handler=_needs_extra("train", lambda a, s: train.main_args(a)))

    p = subparsers.add_parser(
        "evaluate", help="evaluate a model on a labelled CSV manifest (needs [train])"
    )
    evaluate.add_arguments(p)
    p.set_defaults(handler=_needs_extra("evaluate", evaluate.run))


def missing_extra(command: str) -> list[str]:
    """The modules of the ``[train]`` extra that ``command`` needs and this install lacks."""
    return [m for m in EXTRA_MODULES.get(command, ()) if importlib.util.find_spec(m) is None]


def _needs_extra(command: str, handler: Any) -> Any:
    def run(args: argparse.Namespace, settings: Any) -> int:
        missing = missing_extra(command)
        if missing:
            print(
                f"error: '{command}' needs the [train] extra ({', '.join(missing)} not "
                f"installed): {INSTALL_HINT}",
                file=sys.stderr,
            )
            return 2
        return int(handler(args, settings))

    return run


def iter_inputs(paths: Sequence[Path]) -> Iterator[Path]:
    """Files as given; folders walked recursively in sorted order, hidden files skipped."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path)
                if child.is_file() and not any(part.startswith(".") for part in rel.parts):
                    yield child
        else:
            yield path


def classify(args: argparse.Namespace, settings: Any) -> int:
    """``settings``: the entry point's ``Settings`` (its ``model_dir`` is the default model)."""
    from fracture_triage.verdict import decide
    from model.artifact import resolve_model_dir
    from model.inference import Classifier, ExportError, predict_files

    try:
        model_dir = resolve_model_dir(args.model or getattr(settings, "model_dir", None))
        classifier = Classifier.load(model_dir)
    except (ExportError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    files = list(iter_inputs(args.paths))
    failed = 0
    for path in args.paths:
        if not path.exists():
            files.remove(path)
            failed += 1
            _report(args.json, path, f"no such file or directory: {path}")
    for path, result in predict_files(classifier, files):
        if isinstance(result, str):
            failed += 1
            _report(args.json, path, result)
            continue
        card = classifier.card
        # "fracture": flagged at the lower threshold; "decision": the three levels.
        fracture = result >= card.threshold
        decision = decide(result, card.threshold, card.upper)
        if args.json:
            print(
                json.dumps(
                    {
                        "file": str(path),
                        "probability": round(result, 6),
                        "fracture": fracture,
                        "decision": decision.value,
                    }
                )
            )
        else:
            thresholds = f"threshold {card.threshold:.4f}"
            if card.upper != card.threshold:
                thresholds = f"thresholds {card.threshold:.4f} / {card.upper:.4f}"
            print(f"{path}: {decision.value.upper()} (probability {result:.4f}, {thresholds})")
        sys.stdout.flush()
    return 1 if failed else 0


def _report(as_json: bool, path: Path, error: str) -> None:
    if as_json:
        print(json.dumps({"file": str(path), "error": error}))
    else:
        print(f"{path}: ERROR {error}")
    print(f"error: {path}: {error}", file=sys.stderr)
