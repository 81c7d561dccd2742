"""The design card's rules that a machine can check: import direction and public APIs."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# package -> packages it must never import
FORBIDDEN = {
    "pipeline": {"models", "flows", "viewer", "privacy"},
    "privacy": {"models", "flows", "viewer"},
    "models": {"flows", "viewer"},
    "viewer": {"models", "flows"},
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package):
    for path in (ROOT / package).rglob("*.py"):
        bad = _imports(path) & FORBIDDEN[package]
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


@pytest.mark.parametrize("package", ["pipeline", "privacy", "models", "flows"])
def test_public_api_names_exist(package):
    module = importlib.import_module(package)
    assert module.__all__
    for name in module.__all__:
        assert hasattr(module, name), f"{package}.{name}"


def test_library_code_does_not_print():
    for package in ("pipeline", "privacy", "models"):
        for path in (ROOT / package).rglob("*.py"):
            if path.name == "train_tissue_qc.py":
                continue  # a script's entry point
            calls = [
                n for n in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "print"
            ]
            assert not calls, f"{path.relative_to(ROOT)} calls print()"
