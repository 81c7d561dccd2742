"""A crash inside the native slide library costs one slide of a local `wsiflow run`, not the run.

The crash is real: a test-only ``sitecustomize`` (tests/_crashinject) makes every read from
one generated slide dereference NULL in C. With isolation (the default) that slide fails
with a `worker` error and the next slide completes; with ``--no-isolate`` the same crash
kills the whole command, which shows the injected crash is real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests._synthetic import BACKGROUND, TISSUE, write_pyramid_tiff

pytestmark = pytest.mark.slow  # see DEVELOPERS.md: `make check` runs the tests not marked slow

CRASH_DIR = Path(__file__).resolve().parent / "_crashinject"
CRASH_SIZE = (1234, 987)  # level-0 size no other test slide has


def _crash_slide(folder: Path) -> Path:
    image = np.full((CRASH_SIZE[1], CRASH_SIZE[0], 3), BACKGROUND, dtype=np.uint8)
    image[200:800, 300:1000] = TISSUE
    return write_pyramid_tiff(folder / "crashes.tiff", image, 0.5, levels=2)


def _run(cli: list[str], *args: object) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(CRASH_DIR), os.environ.get("PYTHONPATH", "")]),
        "WSIFLOW_TEST_CRASH_LEVEL0": f"{CRASH_SIZE[0]}x{CRASH_SIZE[1]}",
    }
    return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=900, env=env)


def test_a_native_crash_fails_one_slide_and_the_run_goes_on(wsiflow_cli, cmu_svs, tmp_path):
    crash = _crash_slide(tmp_path)
    out = tmp_path / "out"
    done = _run(wsiflow_cli, "run", crash, cmu_svs, "--out", out, "--stride", "112", "--json")
    assert done.returncode == 1 and done.stdout, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["command"] == "run" and report["state"] == "Partially failed"
    rows = report["slides"]
    assert [r["status"] for r in rows] == ["failed", "done"]
    assert rows[0]["error"]["kind"] == "worker" and "died" in rows[0]["error"]["message"]
    assert rows[0]["slide_id"] and rows[0]["slide_id"].startswith("s-")
    assert (Path(rows[1]["result_dir"]) / "result.json").is_file()
    assert "Traceback" not in done.stderr and crash.name not in done.stdout + done.stderr
    assert list(out.glob(f"{rows[1]['slide_id']}/*/v*/result.json"))  # the pattern finds results...
    assert not list(out.glob(f"{rows[0]['slide_id']}/*/v*/result.json"))  # ...and the crashed slide has none


def test_without_isolation_the_same_crash_kills_the_whole_command(wsiflow_cli, cmu_svs, tmp_path):
    crash = _crash_slide(tmp_path)
    done = _run(wsiflow_cli, "run", crash, cmu_svs, "--out", tmp_path / "out", "--stride", "112", "--json",
                "--no-isolate")
    assert done.returncode in (-signal.SIGSEGV, 128 + signal.SIGSEGV), (done.returncode, done.stderr[-2000:])
    assert not list((tmp_path / "out").glob("*/*/v*/result.json"))  # the good slide never ran
