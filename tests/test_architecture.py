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


# --- module graph: cycles, private names across packages, orchestration vs CLI -------------

PACKAGES = ("pipeline", "privacy", "models", "flows", "viewer")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _edges(modules: dict[str, Path]) -> dict[str, set[tuple[str, str | None]]]:
    """module -> {(imported module, imported name or None)}, every import (lazy ones too)."""
    edges: dict[str, set[tuple[str, str | None]]] = {}
    for module, path in modules.items():
        found: set[tuple[str, str | None]] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                found.update((alias.name, None) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path, node)
                for alias in node.names:
                    # `from pkg import _mod` imports a module; `from pkg._m import name` a name.
                    sub = f"{target}.{alias.name}"
                    found.add((sub, None) if sub in modules else (target, alias.name))
        edges[module] = found
    return edges


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle in ``graph`` (module -> modules it imports), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {m: {t for t, _ in targets if t in modules and t != m} for m, targets in _edges(modules).items()}
    # A package's __init__ re-exporting its own modules is the usual shape, not a cycle.
    return {m: {t for t in targets if not m.startswith(f"{t}.")} for m, targets in graph.items()}


def test_no_import_cycles():
    cycle = _find_cycle(_graph(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_private_names_across_packages():
    modules = _modules()
    problems = []
    for module, targets in _edges(modules).items():
        home = module.split(".")[0]
        for target, name in targets:
            top = target.split(".")[0]
            if top == home or top not in PACKAGES:
                continue
            private_module = any(part.startswith("_") for part in target.split(".")[1:])
            private_name = name is not None and name.startswith("_")
            if private_module or private_name:
                problems.append(f"{module} uses {target}{'.' + name if name else ''}")
    assert not problems, "\n".join(problems)


def test_orchestration_never_imports_the_cli():
    modules = _modules()
    for module, targets in _edges(modules).items():
        if module.startswith("flows") and not module.startswith("flows.cli"):
            bad = {t for t, _ in targets if t == "flows.cli" or t.startswith("flows.cli.")}
            assert not bad, f"{module} imports the CLI ({bad})"


def test_the_cycle_check_can_fail(tmp_path, monkeypatch):
    """A cycle through a lazy import, planted in a throwaway package, is found."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from ._a import x\n")
    (package / "_a.py").write_text("from ._b import y\nx = 1\n")
    (package / "_b.py").write_text("y = 2\ndef later():\n    from ._a import x\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    modules = {_module_name(p): p for p in package.glob("*.py")}
    assert _find_cycle(_graph(modules)) == ["pkg._a", "pkg._b", "pkg._a"]
