"""One bad slide never takes a run or batch down (issue 14, finding 3).

Before: a header claiming 10^6 x 10^6 px at 2 µm/px made the tissue rendering allocate
175 GiB (a MemoryError that ended the run with a traceback); at 0.25 µm/px `inspect` and
`run` read for hours; a model with 4096 px tiles ran batches of 64 (tens of GiB); any
exception that was not wsiflow's own ended the run; no slide had a time limit.

Now: renderings are bounded before anything is allocated (``pipeline.Slide.check_rendering``),
batches of huge tiles are reduced (``pipeline._engine.batch_size_for``), every exception of a
slide's analysis fails that slide only (``flows._slide_job.analyse_job``), and a slide past
``--slide-time-limit`` fails alone (stopped cooperatively, or its child process is ended).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from models import Registry
from pipeline import (
    AnalysisParams,
    ConfigError,
    EngineSettings,
    GridSettings,
    ModelInfo,
    RunSettings,
    WorkerError,
    analyse_slide,
    inspect_slide,
    open_slide,
)
from pipeline._engine import MAX_BATCH_INPUT_BYTES, batch_size_for, classify_stream
from tests._models import add_tiny_model, add_tiny_model_with_tiles
from tests._synthetic import BACKGROUND, TISSUE, write_huge_header_tiff, write_pyramid_tiff

NETGUARD = Path(__file__).resolve().parent / "_netguard" / "sitecustomize.py"

# name -> (level-0 side in px, µm/px, expected kind)
HUGE = {
    "absurd.tiff": (10**6, 2.0, "corrupt"),  # 2 m a side: no glass slide is that large
    "vast.tiff": (10**6, 0.25, "unsupported"),  # 250 mm: its tissue rendering would be 31,250 px square
    "flat.tiff": (60_000, 0.25, "unsupported"),  # 15 mm but one level: 3.6 Gpx to read for the rendering
}


def _huge(folder: Path, name: str) -> Path:
    side, mpp, _ = HUGE[name]
    return write_huge_header_tiff(folder / name, side, side, mpp)


def _good(folder: Path, name: str = "good.tiff", side: int = 1024, mpp: float = 0.5) -> Path:
    image = np.full((side, side, 3), BACKGROUND, dtype=np.uint8)
    image[side // 8 : 7 * side // 8, side // 8 : 7 * side // 8] = TISSUE
    return write_pyramid_tiff(folder / name, image, mpp, levels=2)


def _info(manifest) -> ModelInfo:
    return ModelInfo(manifest.name, manifest.version, manifest.weights_sha256,
                     tuple(c.color for c in manifest.classes))


# --- fast: the bounds themselves -----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HUGE))
def test_a_huge_header_is_refused_before_its_rendering_is_allocated(tmp_path, name):
    path = _huge(tmp_path, name)
    report = inspect_slide(path, secret=b"k" * 32)  # before: MemoryError (absurd) or hours of reads
    assert report.error is not None and report.error.kind == HUGE[name][2], report.error
    assert name not in report.error.one_line() and report.error.hint
    with open_slide(path) as slide, pytest.raises(type(report.error)):
        slide.read_thumbnail(8.0)
    if name == "vast.tiff":  # the remedy names a tissue.mask_mpp that fits
        assert "tissue.mask_mpp to 31 or more" in report.error.hint


def test_a_plausible_slide_renders_as_before(tmp_path):
    with open_slide(_good(tmp_path)) as slide:
        assert slide.check_rendering(8.0) == (64, 64)
        assert slide.read_thumbnail(8.0).shape == (64, 64, 3)


def test_batches_of_huge_tiles_stay_within_the_bound():
    assert batch_size_for(224, 64) == 64  # the usual models are untouched
    assert batch_size_for(1024, 64) == 21
    assert batch_size_for(4096, 64) == 1
    assert batch_size_for(4096, 64) * 12 * 4096**2 <= max(MAX_BATCH_INPUT_BYTES, 12 * 4096**2)
    with pytest.raises(ConfigError, match="10,000 px tiles"):
        batch_size_for(10_000, 1)


def test_the_engine_runs_the_reduced_batches(tmp_path, monkeypatch):
    registry = Registry(site_root=tmp_path)
    add_tiny_model(registry)
    classifier = registry.load("tiny")
    per_tile = 12 * 64 * 64
    monkeypatch.setattr("pipeline._engine.MAX_BATCH_INPUT_BYTES", 3 * per_tile)
    tiles = np.random.default_rng(0).integers(0, 255, (7, 64, 64, 3), dtype=np.uint8)
    seen: list[int] = []
    out = classify_stream(classifier, tiles.__getitem__, range(7), EngineSettings(batch_size=64, readers=1,
                                                                                  device="cpu"), seen.append)
    assert seen == [3, 3, 1] and out.shape == (7, 2)


def test_the_time_limit_is_a_checked_engine_setting(tmp_path):
    from flows import WsiflowConfig
    from flows.cli import build_parser
    from flows.cli._options import settings_from_options

    assert EngineSettings().slide_time_limit_s == 6 * 3600
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ConfigError, match="slide_time_limit_s"):
            EngineSettings(slide_time_limit_s=bad)
    for given, expected in (("3", 3.0), ("0", None)):
        args = build_parser().parse_args(["run", "x", "--out", str(tmp_path), "--slide-time-limit", given])
        assert settings_from_options(WsiflowConfig(), args).engine.slide_time_limit_s == expected
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "x", "--out", str(tmp_path), "--slide-time-limit", "-3"])


def test_in_process_a_slide_past_its_time_limit_fails_between_steps(tmp_path):
    registry = Registry(site_root=tmp_path / "models")
    manifest = add_tiny_model(registry)
    classifier = registry.load("tiny")
    slide = _good(tmp_path)

    def settings(limit: float | None) -> RunSettings:
        return RunSettings(out_dir=tmp_path / "out", model="tiny", analysis=AnalysisParams(grid=GridSettings()),
                           engine=EngineSettings(batch_size=4, readers=1, device="cpu", slide_time_limit_s=limit))

    late = analyse_slide(slide, classifier, _info(manifest), settings(1e-9), secret=b"k" * 32)
    assert late.status == "failed" and late.error is not None and late.error.kind == "worker", late.error
    assert "time limit of 1e-09 s" in late.error.message and "--slide-time-limit" in late.error.hint
    assert isinstance(late.error, WorkerError) and late.error.transient is False  # a batch must not retry it
    done = analyse_slide(slide, classifier, _info(manifest), settings(None), secret=b"k" * 32)
    assert done.status == "done", done.error


def test_unexpected_exceptions_become_worker_errors_without_their_text():
    from flows._slide_job import contained_error

    oom = contained_error(RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                       "memory: you tried to allocate 68719476736 bytes"))
    assert oom.kind == "worker" and "ran out of memory" in oom.message and "--batch-size" in oom.hint
    assert "ran out of memory" in contained_error(MemoryError()).message
    odd = contained_error(ZeroDivisionError("/data/patients/jane-doe.svs"))
    assert "unexpected ZeroDivisionError" in odd.message and "--debug" in odd.hint
    assert "jane" not in odd.one_line() and odd.transient is False


# --- slow: whole commands --------------------------------------------------------------------


def _cli(cli: list[str], *args: object, env: dict[str, str] | None = None,
         timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def _report(done: subprocess.CompletedProcess[str], command: str) -> list[dict]:
    assert done.returncode == 1 and done.stdout, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert report["command"] == command and report["state"] == "Partially failed", report
    return report["slides"]


@pytest.fixture
def models_env(tmp_path) -> dict[str, str]:
    root = tmp_path / "models"
    registry = Registry(site_root=root)
    add_tiny_model(registry)  # 64 px tiles at 4 µm/px
    add_tiny_model_with_tiles(registry, "tiles4k", 4096, 2.0)  # one tile is 8.2 mm wide
    return {"WSIFLOW_MODELS_DIR": str(root)}


def _huge_and_good(tmp_path: Path) -> tuple[list[Path], list[str]]:
    folder = tmp_path / "slides"
    folder.mkdir()
    huge = [_huge(folder, name) for name in sorted(HUGE)]
    good = _good(folder, side=3072, mpp=2.0)  # 6 mm of which 4.6 mm tissue: one 4096 px tile
    return [*huge, good], [HUGE[name][2] for name in sorted(HUGE)]


def _check_huge_and_good(rows: list[dict], kinds: list[str], names: list[str], stderr: str) -> None:
    assert [r["status"] for r in rows] == ["failed"] * len(kinds) + ["done"], rows
    assert [r["error"]["kind"] for r in rows[:-1]] == kinds
    assert rows[-1]["tiles"] >= 1 and rows[-1]["model"] == "tiles4k@1"
    for row in rows[:-1]:
        assert row["slide_id"] and not any(name in json.dumps(row) for name in names)
    assert not any(name in stderr for name in names)


@pytest.mark.slow
def test_huge_headers_and_a_4096_px_model_in_a_run(wsiflow_cli, models_env, tmp_path):
    slides, kinds = _huge_and_good(tmp_path)
    done = _cli(wsiflow_cli, "run", *slides, "--out", tmp_path / "out", "--model", "tiles4k",
                "--min-tissue-fraction", "0.05", "--json", env=models_env)
    rows = _report(done, "run")
    _check_huge_and_good(rows, kinds, [p.name for p in slides], done.stderr)
    assert len([line for line in done.stderr.splitlines() if " failed: " in line]) == len(kinds)


@pytest.mark.slow
def test_huge_headers_and_a_4096_px_model_in_a_batch(prefect_server, wsiflow_cli, models_env, tmp_path):
    slides, kinds = _huge_and_good(tmp_path)
    env = {**models_env, "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(prefect_server["home"])}
    done = _cli(wsiflow_cli, "batch", *slides, "--out", tmp_path / "out", "--model", "tiles4k",
                "--min-tissue-fraction", "0.05", "--json", env=env)
    rows = _report(done, "batch")
    _check_huge_and_good(rows, kinds, [p.name for p in slides], done.stderr)


@pytest.mark.slow
def test_a_slide_past_its_time_limit_fails_alone_and_the_next_one_runs(wsiflow_cli, models_env, tmp_path):
    # One level of 45,000 px at 0.25 µm/px: rendering it for tissue detection reads 2 Gpx
    # (just within the bound) for minutes, in calls the child cannot check the limit
    # between: the parent ends the child, and the next slide gets a new one.
    slow = write_huge_header_tiff(tmp_path / "slow.tiff", 45_000, 45_000, 0.25)
    good = _good(tmp_path)
    done = _cli(wsiflow_cli, "run", slow, good, "--out", tmp_path / "out", "--model", "tiny",
                "--slide-time-limit", "5", "--json", env=models_env)
    rows = _report(done, "run")
    assert [r["status"] for r in rows] == ["failed", "done"], rows
    error = rows[0]["error"]
    assert error["kind"] == "worker" and "time limit of 5 s" in error["message"], error
    assert "its process was stopped" in error["message"]  # by the parent: the child was in a long read
    assert "--slide-time-limit" in error["hint"] and "finished chunks are kept" in error["hint"]
    assert rows[0]["slide_id"] and rows[1]["tiles"] >= 1


def _raising_site(folder: Path, exception: str, level0: tuple[int, int]) -> dict[str, str]:
    """A test-only sitecustomize: every read from slides with this level-0 size raises
    ``exception`` (not a wsiflow error), in whichever process reads it."""
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(
        "import runpy\n"
        f"runpy.run_path({str(NETGUARD)!r})\n"
        "from pipeline import _backend\n"
        "def _raising(read):\n"
        "    def read_region(self, x, y, level, w, h):\n"
        f"        if tuple(self.level_dimensions[0]) == {level0!r}:\n"
        f"            raise {exception}('/data/patients/jane-doe: injected')\n"
        "        return read(self, x, y, level, w, h)\n"
        "    return read_region\n"
        "for _cls in (_backend._OpenSlideBackend, _backend._TiffSlideBackend):\n"
        "    _cls.read_region = _raising(_cls.read_region)\n"
    )
    return {"PYTHONPATH": os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
@pytest.mark.parametrize(("exception", "options", "expected"), [
    ("MemoryError", (), "ran out of memory"),
    ("ZeroDivisionError", ("--no-isolate",), "unexpected ZeroDivisionError"),
    ("ZeroDivisionError", ("--debug",), "unexpected ZeroDivisionError"),
], ids=["memory-isolated", "unexpected-in-process", "unexpected-debug"])
def test_any_exception_fails_one_slide_and_the_run_goes_on(wsiflow_cli, models_env, tmp_path, exception, options,
                                                          expected):
    bad, good = _good(tmp_path, "bad.tiff", side=1200), _good(tmp_path)
    env = {**models_env, **_raising_site(tmp_path / "site", exception, (1200, 1200))}
    debug = "--debug" in options
    args = [a for a in options if a != "--debug"]
    done = _cli(wsiflow_cli, *(["--debug"] if debug else []), "run", bad, good, "--out", tmp_path / "out",
                "--model", "tiny", "--json", *args, env=env)
    if debug:  # the traceback only with --debug, and then once
        assert done.stderr.count(f"{exception}: ") == 1, done.stderr[-3000:]
        done = subprocess.CompletedProcess(done.args, done.returncode, done.stdout,
                                           done.stderr.replace("Traceback", "traceback"))
    rows = _report(done, "run")
    assert [r["status"] for r in rows] == ["failed", "done"], rows
    assert rows[0]["error"]["kind"] == "worker" and expected in rows[0]["error"]["message"], rows[0]
    assert "jane" not in done.stdout
    if not debug:
        assert "jane" not in done.stderr
