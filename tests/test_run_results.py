"""`wsiflow run` end to end on the real sample slide: outputs, NGFF validity, resume, reuse."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from models import Registry
from pipeline import (
    AnalysisParams,
    EngineSettings,
    GridSettings,
    ModelInfo,
    ResultFolder,
    RunSettings,
    analyse_slide,
    expand_slide_arguments,
)
from tests.conftest import shared_file

RUN_KEYS = {"input_index", "slide_id", "status", "result_dir", "model", "tiles", "tiles_per_s",
            "chunks_computed", "chunks_total", "mpp", "error"}
REPORT_KEYS = {"command", "batch_id", "state", "counts", "slides"}


def _run(cli, *args, env=None):
    return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def bundled():
    model = Registry().load("tissue-qc")
    m = model.manifest
    return model, ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes))


def _settings(out):
    return RunSettings(
        out_dir=out, model="tissue-qc",
        analysis=AnalysisParams(grid=GridSettings(stride_px=112), chunk_cells=4),
        engine=EngineSettings(batch_size=16, device="cpu"),
    )


def _analyse(slide, model, info, out, **kwargs):
    return analyse_slide(slide, model, info, _settings(out), secret=b"s" * 32, **kwargs)


def _report(completed):
    """The one JSON document of `run --json` / `batch --json`."""
    document = json.loads(completed.stdout)
    assert REPORT_KEYS <= document.keys(), document.keys()
    assert all(RUN_KEYS <= row.keys() for row in document["slides"])
    return document


@pytest.mark.slow
def test_outputs_are_complete_valid_and_free_of_the_file_name(bundled, cmu_svs, tmp_path):
    model, info = bundled
    outcome = _analyse(cmu_svs, model, info, tmp_path)
    assert outcome.status == "done", outcome.error
    result = outcome.result_dir
    assert outcome.model == "tissue-qc@2"
    assert outcome.mpp is not None and outcome.mpp.source == "metadata"
    # OUT/<slide id>/<model>/v<version>-<params digest>/, with OUT/<slide id>/<model>/latest -> it.
    assert result.parent.parent == tmp_path / outcome.slide_id and result.parent.name == "tissue-qc"
    assert re.fullmatch(r"v2-[0-9a-f]{12}", result.name), result.name
    latest = ResultFolder.latest(tmp_path, outcome.slide_id, "tissue-qc")
    assert latest.path.is_symlink() and latest.path.resolve() == result.resolve()
    assert ResultFolder.find(tmp_path / outcome.slide_id).path.resolve() == result.resolve()
    assert ResultFolder(result).is_complete()
    for name in ("heatmap.ome.zarr", "tissue.ome.zarr", "tiles.parquet", "results.geojson", "summary.json", "overview.png", "result.json"):
        assert (result / name).exists(), name
    assert not (result / ".work").exists()

    table = pq.read_table(result / "tiles.parquet")
    assert table.num_rows == outcome.tiles
    for column in ("slide_id", "model", "x", "y", "width", "height", "x_um", "y_um", "cell_area_um2",
                   "prob_tissue", "prob_pen", "predicted_class"):
        assert column in table.column_names
    assert set(table.column("slide_id").to_pylist()) == {outcome.slide_id}
    assert set(table.column("model").to_pylist()) == {"tissue-qc@2"}
    probs = np.stack([table.column(c).to_numpy() for c in table.column_names if c.startswith("prob_")], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-4)
    predicted = np.array(table.column("predicted_class").to_pylist())
    assert (predicted == "tissue").mean() > 0.5

    geo = json.loads((result / "results.geojson").read_text())
    kinds = {f["properties"]["objectType"] for f in geo["features"]}
    assert kinds == {"detection", "annotation"}
    detection = next(f for f in geo["features"] if f["properties"]["objectType"] == "detection")
    assert set(detection["properties"]["measurements"]) == {
        "prob_background", "prob_tissue", "prob_pen", "prob_blur",
        "tissue_fraction", "tile_x", "tile_y", "tile_width", "tile_height",
    }

    summary = json.loads((result / "summary.json").read_text())
    assert summary["tiles"] == outcome.tiles
    assert summary["provenance"]["model"] == {"name": "tissue-qc", "version": 2, "sha256": info.sha256}
    assert summary["provenance"]["mpp"]["source"] == "metadata"
    assert summary["provenance"]["parameters"]["grid"]["stride_px"] == 112
    assert summary["provenance"]["parameters"]["grid_spec"]["stride_px"] == 112
    assert summary["provenance"]["parameters"]["chunk_cells"] == 4
    typed = ResultFolder(result).read_summary()
    assert typed.slide_id == outcome.slide_id and typed.tiles == outcome.tiles
    assert (typed.model.name, typed.model.version, typed.model.sha256) == ("tissue-qc", 2, info.sha256)
    assert typed.mpp == outcome.mpp
    assert summary["classes"]["tissue"]["fraction"] > 0.5
    assert len(summary["hotspots"]["pen"]) == 10
    assert summary["timings"]["tiles_per_s"] > 0
    # Which reader decoded the pixels (part of the run key) and where the time went.
    assert summary["provenance"]["reader"] == "openslide+jpeg-direct/2"
    assert {"open_s", "prepare_s", "tissue_s", "inference_s", "finalize_s"} <= summary["timings"].keys()
    assert {"heatmap_pyramid_s", "tile_table_s", "geojson_s", "overview_read_s"} <= summary["timings"]["parts"].keys()

    # Nothing written names the slide file or carries its free-text metadata.
    for path in result.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in (cmu_svs.name.encode(), b"CMU-1", b"CPAPERIOCS", b"b414003d"):
                assert needle not in data, (path.name, needle)


@pytest.mark.slow
def test_heatmap_reads_with_an_ngff_reader(bundled, cmu_svs, tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    model, info = bundled
    outcome = _analyse(cmu_svs, model, info, tmp_path)
    location = parse_url(str(outcome.result_dir / "heatmap.ome.zarr"))
    assert location is not None
    nodes = list(Reader(location)())
    image = nodes[0]
    assert image.specs and any(isinstance(s, Multiscales) for s in image.specs)
    assert [a["name"] for a in image.metadata["axes"]] == ["c", "y", "x"]
    assert image.metadata["name"] == ["background", "tissue", "pen", "blur"] or image.metadata.get("channel_names")
    level0 = np.asarray(image.data[0])
    assert level0.shape[0] == 4
    transforms = image.metadata["coordinateTransformations"][0]
    assert transforms[0]["scale"] == [1.0, 112.0, 112.0]
    assert transforms[1]["translation"] == [0.0, 112.0, 112.0]
    tissue = list(Reader(parse_url(str(outcome.result_dir / "tissue.ome.zarr")))())[0]
    assert np.asarray(tissue.data[0]).max() == 1


class _Killed(Exception):
    pass


@pytest.mark.slow
def test_interrupted_run_resumes_bit_identically_and_redoes_only_unfinished_chunks(bundled, cmu_svs, tmp_path):
    model, info = bundled
    reference = _analyse(cmu_svs, model, info, tmp_path / "reference")
    ref_heatmap = np.asarray(zarr.open_array(str(reference.result_dir / "heatmap.ome.zarr" / "0"), mode="r")[...])

    def dies_after_two(tasks, job, run, advance):
        for n, task in enumerate(tasks):
            if n == 2:
                raise _Killed
            run([task])

    out = tmp_path / "interrupted"
    with pytest.raises(_Killed):
        _analyse(cmu_svs, model, info, out, executor=dies_after_two)
    # Killed before the end: no `latest` yet; the one unfinished result folder holds the markers.
    model_dir = out / reference.slide_id / "tissue-qc"
    assert not (model_dir / "latest").exists()
    (result_dir,) = model_dir.glob("v*")
    assert result_dir.name == reference.result_dir.name  # same parameters: same folder name
    assert not (result_dir / "result.json").exists()
    assert len(list((result_dir / ".work" / "chunks").glob("*.done"))) == 2

    resumed = _analyse(cmu_svs, model, info, out)
    assert resumed.status == "done"
    assert resumed.chunks_total == reference.chunks_total > 2
    assert resumed.chunks_computed == resumed.chunks_total - 2
    assert resumed.result_dir == result_dir
    heatmap = np.asarray(zarr.open_array(str(result_dir / "heatmap.ome.zarr" / "0"), mode="r")[...])
    np.testing.assert_array_equal(heatmap, ref_heatmap)
    assert pq.read_table(result_dir / "tiles.parquet").equals(pq.read_table(reference.result_dir / "tiles.parquet"))

    again = _analyse(cmu_svs, model, info, out)
    assert again.status == "reused" and again.tiles == reference.tiles and again.result_dir == result_dir


@pytest.mark.slow
def test_cli_run_batch_with_a_bad_slide_reuse_and_force(wsiflow_cli, cmu_svs, tmp_path):
    bad = shared_file("bad/unreadable-corrupt-tile.svs")
    out = tmp_path / "out"
    # A missing argument stops the run (exit 2, tests/test_failure_modes.py); a slide that
    # vanished from a folder (a broken link) fails only itself.
    links = tmp_path / "links"
    links.mkdir()
    (links / "gone.svs").symlink_to(tmp_path / "nowhere.svs")
    args = ("run", cmu_svs, bad, links, "--out", out, "--stride", "112", "--json")
    first = _run(wsiflow_cli, *args)
    assert first.returncode == 1, first.stderr
    report = _report(first)
    assert report["command"] == "run" and report["batch_id"] is None
    assert report["state"] == "Partially failed"
    assert report["counts"] == {"done": 1, "reused": 0, "failed": 2}
    rows = report["slides"]
    assert [r["input_index"] for r in rows] == [0, 1, 2]
    assert [r["status"] for r in rows] == ["done", "failed", "failed"]
    assert [r["error"]["kind"] for r in rows[1:]] == ["corrupt", "not-found"]
    assert Path(rows[0]["result_dir"]).is_absolute() and Path(rows[0]["result_dir"]).is_dir()
    assert rows[0]["tiles"] > 0 and rows[0]["model"] == "tissue-qc@2"
    assert rows[0]["mpp"]["source"] == "metadata" and rows[0]["mpp"]["override"] is None
    assert "Traceback" not in first.stderr and bad.name not in first.stdout + first.stderr
    second = _run(wsiflow_cli, "run", cmu_svs, "--out", out, "--stride", "112")
    assert second.returncode == 0 and "reused" in second.stdout
    forced = _run(wsiflow_cli, "run", cmu_svs, "--out", out, "--stride", "112", "--force", "--json")
    forced_row = _report(forced)["slides"][0]
    assert forced_row["status"] == "done" and forced_row["result_dir"] == rows[0]["result_dir"]
    other = _run(wsiflow_cli, "run", cmu_svs, "--out", out, "--stride", "224", "--json")
    other_row = _report(other)["slides"][0]
    assert other_row["status"] == "done"  # other parameters: recomputed...
    # ...beside the first result, which is kept; `latest` points at the newest.
    assert other_row["result_dir"] != rows[0]["result_dir"]
    assert ResultFolder(Path(rows[0]["result_dir"])).is_complete()
    assert ResultFolder(Path(other_row["result_dir"])).is_complete()
    latest = ResultFolder.latest(out, other_row["slide_id"], "tissue-qc")
    assert latest.path.resolve() == Path(other_row["result_dir"]).resolve()


def test_folder_and_glob_arguments(wsiflow_cli, tmp_path, cmu_svs):
    folder = tmp_path / "inbox"
    folder.mkdir()
    os.symlink(cmu_svs, folder / "a.svs")
    (folder / "notes.txt").write_text("not a slide")

    assert expand_slide_arguments([str(folder)]) == [folder / "a.svs"]
    assert expand_slide_arguments([str(folder / "*.svs"), str(folder / "a.svs")]) == [folder / "a.svs"]
    dicom = shared_file("dicom/cmu-1-small-region-lossless")
    assert expand_slide_arguments([str(dicom)]) == [dicom]


def test_concurrent_submissions_compute_once(bundled, cmu_svs, tmp_path):
    """Two runs of the same slide at once: one computes, the other waits and reuses."""
    from concurrent.futures import ThreadPoolExecutor

    model, info = bundled
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: _analyse(cmu_svs, model, info, tmp_path), range(2)))
    assert sorted(o.status for o in outcomes) == ["done", "reused"]
