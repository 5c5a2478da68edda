"""The model's subcommands of ``fracture-triage``: ``train``, ``evaluate``, ``classify``.

``fracture_triage.cli`` calls :func:`add_commands`; ``python -m model.cli`` runs them alone.
Each subcommand stores its handler in ``func`` (``args.func(args)`` returns the exit code).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any


def add_commands(subparsers: Any) -> None:
    """Register ``train``, ``evaluate`` and ``classify`` on an argparse subparsers object."""
    from model import evaluate, train

    p = subparsers.add_parser("train", help="train the fracture classifier, write an artifact")
    train.add_arguments(p)
    p.set_defaults(func=lambda a: train.main_args(a))

    p = subparsers.add_parser("evaluate", help="evaluate a model on a labelled CSV manifest")
    evaluate.add_arguments(p)
    p.set_defaults(func=evaluate.run)

    p = subparsers.add_parser("classify", help="classify DICOM or picture files and folders")
    p.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    p.add_argument("--model", type=Path, default=None, help="artifact dir (default: shipped)")
    p.add_argument("--json", action="store_true", help="one JSON object per input")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=classify)


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


def classify(args: argparse.Namespace, settings: Any = None) -> int:
    """``settings``: the entry point's ``Settings`` (its ``model_dir`` is the default model)."""
    from model.inference import Classifier
    from model.training.evaluate import predict_files

    model_dir = args.model
    if model_dir is None:
        from fracture_triage.settings import Settings

        model_dir = (settings or Settings()).model_dir
    if model_dir is None:
        print("error: no model; pass --model DIR", file=sys.stderr)
        return 2
    classifier = Classifier.load(Path(model_dir))
    files = list(iter_inputs(args.paths))
    failed = 0
    for path in args.paths:
        if not path.exists():
            files.remove(path)
            failed += 1
            _report(args.json, path, f"no such file or directory: {path}")
    for path, result in predict_files(classifier, files, batch_size=args.batch_size):
        if isinstance(result, str):
            failed += 1
            _report(args.json, path, result)
            continue
        fracture = result >= classifier.threshold
        if args.json:
            print(
                json.dumps(
                    {"file": str(path), "probability": round(result, 6), "fracture": fracture}
                )
            )
        else:
            verdict = "FRACTURE" if fracture else "no fracture"
            threshold = classifier.threshold
            print(f"{path}: {verdict} (probability {result:.4f}, threshold {threshold:.4f})")
        sys.stdout.flush()
    return 1 if failed else 0


def _report(as_json: bool, path: Path, error: str) -> None:
    if as_json:
        print(json.dumps({"file": str(path), "error": error}))
    else:
        print(f"{path}: ERROR {error}")
    print(f"error: {path}: {error}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fracture-triage", description="fracture classifier")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
