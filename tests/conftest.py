"""Shared fixtures: real data from ../shared/data (skipped when absent), an isolated site dir."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("WSIFLOW_TEST_DATA", ROOT.parent / "shared" / "data"))
SAMPLE_FALLBACK = ROOT / ".cache" / "sample" / "CMU-1-Small-Region.svs"


@pytest.fixture(autouse=True, scope="session")
def _isolated_site(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Each test session gets its own site dir (secret, registry) and offline env."""
    os.environ["WSIFLOW_HOME"] = str(tmp_path_factory.mktemp("site"))
    os.environ.pop("WSIFLOW_CONFIG", None)
    from pipeline import apply_offline_env

    apply_offline_env()


def shared_file(relative: str) -> Path:
    """A file from the shared data folder, or skip the test saying where it was looked for."""
    path = DATA_DIR / relative
    if not path.exists() and relative == "slides/CMU-1-Small-Region.svs" and SAMPLE_FALLBACK.exists():
        return SAMPLE_FALLBACK
    if not path.exists():
        pytest.skip(f"test data {relative} not found under {DATA_DIR} (set WSIFLOW_TEST_DATA)")
    return path


@pytest.fixture
def cmu_svs() -> Path:
    return shared_file("slides/CMU-1-Small-Region.svs")


@pytest.fixture
def wsiflow_cli() -> list[str]:
    """The installed console script, run as a real subprocess."""
    exe = shutil.which("wsiflow", path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.fail("the wsiflow console script is not installed in this environment")
    return [exe]


_XVFB: subprocess.Popen | None = None


def pytest_configure(config: pytest.Config) -> None:
    """A virtual screen for the napari tests when there is none (Qt needs one for OpenGL)."""
    global _XVFB
    if os.environ.get("DISPLAY") or shutil.which("Xvfb") is None:
        return
    for number in range(90, 110):
        if not Path(f"/tmp/.X11-unix/X{number}").exists() and not Path(f"/tmp/.X{number}-lock").exists():
            break
    _XVFB = subprocess.Popen(
        ["Xvfb", f":{number}", "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        if Path(f"/tmp/.X11-unix/X{number}").exists():
            break
        import time

        time.sleep(0.05)
    os.environ["DISPLAY"] = f":{number}"
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")


def pytest_unconfigure(config: pytest.Config) -> None:
    if _XVFB is not None:
        _XVFB.terminate()
        _XVFB.wait(timeout=10)
