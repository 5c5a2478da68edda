"""The layering the README's Architecture section describes, read from the source (imports
anywhere in a module, including those inside functions):

- the shared package's rule modules import nothing of the project;
- the entry points (``fracture_triage.cli``, ``fracture_triage.up``) are imported by nothing;
- ``db`` knows no role and no model;
- the model runtime (card, export loader, imaging) knows no database, queue or network role,
  and nothing the node runs imports ``model.training`` or ``model.experiments``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PROJECT = ("fracture_triage", "dicom_node", "worker", "model", "db", "api")
SHARED_RULES = ("settings", "messages", "uids", "attributes", "verdict", "files")
NODE = ("dicom_node", "worker", "db", "api", "fracture_triage")


def imports_of(path: Path) -> set[str]:
    """Every module name ``path`` imports (absolute imports; the project uses no others)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules(package: str) -> dict[str, set[str]]:
    root = REPO / package
    return {
        ".".join(p.relative_to(REPO).with_suffix("").parts): imports_of(p)
        for p in root.rglob("*.py")
    }


def project_imports(names: set[str], *packages: str) -> set[str]:
    return {n for n in names if n.split(".")[0] in packages}


@pytest.mark.parametrize("module", SHARED_RULES)
def test_shared_package_imports_nothing_of_the_project(module: str) -> None:
    names = imports_of(REPO / "fracture_triage" / f"{module}.py")
    assert project_imports(names, *PROJECT) == set()


def test_entry_points_are_imported_by_nothing() -> None:
    for package in PROJECT:
        for module, names in modules(package).items():
            if module in ("fracture_triage.cli", "fracture_triage.up"):
                continue
            bad = {n for n in names if n.startswith(("fracture_triage.cli", "fracture_triage.up"))}
            assert not bad, f"{module} imports the entry point {bad}"


def test_db_knows_no_role_and_no_model() -> None:
    for module, names in modules("db").items():
        bad = project_imports(names, "dicom_node", "worker", "api", "model")
        bad |= {n for n in names if n.startswith(("fracture_triage.cli", "fracture_triage.up"))}
        assert not bad, f"{module} imports {bad}"


def test_model_runtime_knows_no_database_queue_or_role() -> None:
    runtime = {
        "model.artifact": imports_of(REPO / "model" / "artifact.py"),
        "model.inference": imports_of(REPO / "model" / "inference.py"),
        **modules("model/imaging"),
    }
    for module, names in runtime.items():
        bad = project_imports(names, "db", "worker", "dicom_node", "api", "fracture_triage")
        bad |= {n for n in names if n.split(".")[0] in ("sqlalchemy", "celery", "redis", "kombu")}
        bad |= {n for n in names if n.split(".")[0] in ("tensorflow", "keras", "sklearn")}
        bad |= {n for n in names if n.startswith(("model.training", "model.experiments"))}
        assert not bad, f"{module} imports {bad}"


def test_the_node_never_imports_training_or_experiments() -> None:
    for package in NODE:
        for module, names in modules(package).items():
            bad = {n for n in names if n.startswith(("model.training", "model.experiments"))}
            bad |= {n for n in names if n.split(".")[0] in ("tensorflow", "keras")}
            assert not bad, f"{module} imports {bad}"
