"""`wsiflow run` end to end on the real sample slide: outputs, NGFF validity, resume, reuse."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import zarr

from models import Registry
from pipeline import AnalysisParams, EngineSettings, ModelInfo, analyse_slide
from tests.conftest import shared_file

RUN_KEYS = {"slide_id", "status", "result_dir", "tiles", "error"}


def _run(cli, *args, env=None):
    return subprocess.run([*cli, *map(str, args)], capture_output=True, text=True, timeout=900, env=env)


@pytest.fixture(scope="module")
def bundled():
    model = Registry().load("tissue-qc")
    m = model.manifest
    return model, ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes))


def _analyse(slide, model, info, out, **kwargs):
    return analyse_slide(
        slide, model, info, out_dir=out, secret=b"s" * 32,
        params=AnalysisParams(stride_px=112, chunk_cells=4), engine=EngineSettings(batch_size=16, device="cpu"),
        **kwargs,
    )


def test_outputs_are_complete_valid_and_free_of_the_file_name(bundled, cmu_svs, tmp_path):
    model, info = bundled
    outcome = _analyse(cmu_svs, model, info, tmp_path)
    assert outcome.status == "done", outcome.error
    result = outcome.result_dir
    assert result.parent.name == outcome.slide_id and result.name == "tissue-qc"
    for name in ("heatmap.ome.zarr", "tissue.ome.zarr", "tiles.parquet", "results.geojson", "summary.json", "overview.png", "result.json"):
        assert (result / name).exists(), name
    assert not (result / ".work").exists()

    table = pq.read_table(result / "tiles.parquet")
    assert table.num_rows == outcome.tiles
    for column in ("x", "y", "width", "height", "x_um", "y_um", "prob_tissue", "prob_pen", "predicted_class"):
        assert column in table.column_names
    probs = np.stack([table.column(c).to_numpy() for c in table.column_names if c.startswith("prob_")], axis=1)
    np.testing.assert_allclose(probs.sum(axis=1), 1, atol=1e-4)
    predicted = np.array(table.column("predicted_class").to_pylist())
    assert (predicted == "tissue").mean() > 0.5

    geo = json.loads((result / "results.geojson").read_text())
    kinds = {f["properties"]["objectType"] for f in geo["features"]}
    assert kinds == {"detection", "annotation"}
    detection = next(f for f in geo["features"] if f["properties"]["objectType"] == "detection")
    assert set(detection["properties"]["measurements"]) == {"prob_background", "prob_tissue", "prob_pen", "prob_blur"}

    summary = json.loads((result / "summary.json").read_text())
    assert summary["tiles"] == outcome.tiles
    assert summary["provenance"]["model"] == {"name": "tissue-qc", "version": 1, "sha256": info.sha256}
    assert summary["provenance"]["mpp"]["source"] == "metadata"
    assert summary["provenance"]["parameters"]["stride_px"] == 112
    assert summary["classes"]["tissue"]["fraction"] > 0.5
    assert len(summary["hotspots"]["pen"]) == 10
    assert summary["timings"]["tiles_per_s"] > 0

    # Nothing written names the slide file or carries its free-text metadata.
    for path in result.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in (cmu_svs.name.encode(), b"CMU-1", b"CPAPERIOCS", b"b414003d"):
                assert needle not in data, (path.name, needle)


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


def test_interrupted_run_resumes_bit_identically_and_redoes_only_unfinished_chunks(bundled, cmu_svs, tmp_path):
    model, info = bundled
    reference = _analyse(cmu_svs, model, info, tmp_path / "reference")
    ref_heatmap = np.asarray(zarr.open_array(str(reference.result_dir / "heatmap.ome.zarr" / "0"), mode="r")[...])

    def dies_after_two(tasks, job, run, advance):
        for n, task in enumerate(tasks):
            if n == 2:
                raise _Killed
            run(task)

    out = tmp_path / "interrupted"
    with pytest.raises(_Killed):
        _analyse(cmu_svs, model, info, out, executor=dies_after_two)
    result_dir = out / reference.slide_id / "tissue-qc"
    assert not (result_dir / "result.json").exists()
    assert len(list((result_dir / ".work" / "chunks").glob("*.done"))) == 2

    resumed = _analyse(cmu_svs, model, info, out)
    assert resumed.status == "done"
    assert resumed.chunks_total == reference.chunks_total > 2
    assert resumed.chunks_computed == resumed.chunks_total - 2
    heatmap = np.asarray(zarr.open_array(str(result_dir / "heatmap.ome.zarr" / "0"), mode="r")[...])
    np.testing.assert_array_equal(heatmap, ref_heatmap)
    assert pq.read_table(result_dir / "tiles.parquet").equals(pq.read_table(reference.result_dir / "tiles.parquet"))

    again = _analyse(cmu_svs, model, info, out)
    assert again.status == "reused" and again.tiles == reference.tiles


def test_cli_run_batch_with_a_bad_slide_reuse_and_force(wsiflow_cli, cmu_svs, tmp_path):
    bad = shared_file("bad/unreadable-corrupt-tile.svs")
    out = tmp_path / "out"
    args = ("run", cmu_svs, bad, "/nonexistent.svs", "--out", out, "--stride", "112", "--json")
    first = _run(wsiflow_cli, *args)
    assert first.returncode == 1, first.stderr
    rows = json.loads(first.stdout)
    assert all(RUN_KEYS <= row.keys() for row in rows)
    assert [r["status"] for r in rows] == ["done", "failed", "failed"]
    assert [r["error"]["kind"] for r in rows[1:]] == ["corrupt", "not-found"]
    assert Path(rows[0]["result_dir"]).is_dir() and rows[0]["tiles"] > 0
    assert "Traceback" not in first.stderr and bad.name not in first.stdout + first.stderr
    second = _run(wsiflow_cli, "run", cmu_svs, "--out", out, "--stride", "112")
    assert second.returncode == 0 and "reused" in second.stdout
    forced = _run(wsiflow_cli, "run", cmu_svs, "--out", out, "--stride", "112", "--force", "--json")
    assert json.loads(forced.stdout)[0]["status"] == "done"
    other = _run(wsiflow_cli, "run", cmu_svs, "--out", out, "--stride", "224", "--json")
    assert json.loads(other.stdout)[0]["status"] == "done"  # other parameters: recomputed


def test_folder_and_glob_arguments(wsiflow_cli, tmp_path, cmu_svs):
    folder = tmp_path / "inbox"
    folder.mkdir()
    os.symlink(cmu_svs, folder / "a.svs")
    (folder / "notes.txt").write_text("not a slide")
    from flows._cli_run import expand_slides

    assert expand_slides([str(folder)]) == [str(folder / "a.svs")]
    assert expand_slides([str(folder / "*.svs"), str(folder / "a.svs")]) == [str(folder / "a.svs")]
    dicom = shared_file("dicom/cmu-1-small-region-lossless")
    assert expand_slides([str(dicom)]) == [str(dicom)]


def test_concurrent_submissions_compute_once(bundled, cmu_svs, tmp_path):
    """Two runs of the same slide at once: one computes, the other waits and reuses."""
    from concurrent.futures import ThreadPoolExecutor

    model, info = bundled
    with ThreadPoolExecutor(2) as pool:
        outcomes = list(pool.map(lambda _: _analyse(cmu_svs, model, info, tmp_path), range(2)))
    assert sorted(o.status for o in outcomes) == ["done", "reused"]
