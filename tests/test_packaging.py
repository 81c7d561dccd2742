"""The wheel: only the product (no tests/, bench/), with its data files, and it runs outside the checkout."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.conftest import NETGUARD_DIR, ROOT

pytestmark = pytest.mark.slow

# Not part of a source tree to build from: environments, caches, outputs of earlier builds.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv", ".venv-tools", ".cache", ".pytest_cache", ".hypothesis", ".mypy_cache", ".ruff_cache",
    "__pycache__", "*.egg-info", "build", "dist", "demo-out", "validation-*",
)

_CHECK_INSTALLED = textwrap.dedent(
    """
    import importlib.resources, pathlib, sys

    site = pathlib.Path(sys.argv[1]).resolve()
    import configs, flows, models, pipeline, viewer

    for module in (pipeline, flows, configs, models, viewer):
        where = pathlib.Path(module.__file__).resolve()
        assert site in where.parents, (module.__name__, str(where))
    text = importlib.resources.files("configs").joinpath("default.yaml").read_text(encoding="utf-8")
    assert text.strip(), "configs/default.yaml is empty"
    bundled = importlib.resources.files("models").joinpath("bundled")
    assert bundled.is_dir(), "models/bundled is missing"
    print("installed-ok")
    """
)


def _pip(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args, "--disable-pip-version-check", "--no-index"],
        check=False, capture_output=True, text=True, timeout=600, cwd=cwd,
    )


def _bundled_files() -> list[str]:
    bundled = ROOT / "models" / "bundled"
    return sorted(
        p.relative_to(ROOT).as_posix() for p in bundled.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built offline from a copy of the checkout (the build writes build/ and egg-info)."""
    for module in ("setuptools", "pip"):
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is not installed in this environment; install the test extra")
    work = tmp_path_factory.mktemp("wheel")
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE, symlinks=True)
    dist = work / "dist"
    built = _pip("wheel", "--no-deps", "--no-build-isolation", "-w", str(dist), str(source), cwd=work)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    (path,) = dist.glob("wsiflow-*.whl")
    return path


def test_the_wheel_holds_the_product_and_its_data_only(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    top = {name.split("/", 1)[0] for name in names}
    assert "tests" not in top and "bench" not in top, sorted(top)
    assert {"pipeline", "models", "flows", "viewer", "configs"} <= top, sorted(top)
    expected = ["configs/default.yaml", "viewer/napari.yaml", *_bundled_files()]
    assert "models/bundled/tissue-qc/1/weights.safetensors" in expected
    missing = [name for name in expected if name not in names]
    assert not missing, missing
    assert "wsiflow = flows.cli:main" in scripts


def test_the_installed_wheel_runs_outside_the_checkout(wheel, tmp_path, cmu_svs):
    site = tmp_path / "site"
    installed = _pip("install", "--no-deps", "--target", str(site), str(wheel), cwd=tmp_path)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    env = {
        **os.environ,
        # The installed copy first, and the suite's network guard (only these: not the checkout).
        "PYTHONPATH": os.pathsep.join([str(site), str(NETGUARD_DIR)]),
        "WSIFLOW_HOME": str(tmp_path / "home"),
    }
    env.pop("WSIFLOW_CONFIG", None)
    checked = subprocess.run(
        [sys.executable, "-c", _CHECK_INSTALLED, str(site)],
        check=False, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )
    assert checked.returncode == 0 and "installed-ok" in checked.stdout, checked.stdout + checked.stderr

    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "-c", "import sys; from flows.cli import main; sys.exit(main())",
         "run", str(cmu_svs), "--out", str(out), "--stride", "112", "--json"],
        check=False, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(run.stdout)
    (entry,) = report["slides"] if isinstance(report, dict) else report  # the run's JSON: one slide
    assert entry["status"] == "done" and entry["error"] is None, entry
    result_dir = (tmp_path / entry["result_dir"]).resolve()  # an absolute result_dir stays as it is
    assert out.resolve() in result_dir.parents, result_dir
    assert (result_dir / "result.json").is_file()
