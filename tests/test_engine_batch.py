"""The engine's choices when the user leaves them open: batch size (auto), reader threads
from the usable cores, and the run key's reader carried to chunk workers (issue 18)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline import EngineSettings, GridSpec, Preprocessing, WorkerError, open_slide
from pipeline._chunk_run import ChunkJob, check_reader, run_chunks
from pipeline._engine import (
    CPU_BATCH_SIZE,
    EngineStats,
    _Model,
    _trial_fits,
    batch_size_candidates,
    choose_batch_size,
    classify_stream,
    default_readers,
    usable_cores,
)
from tests._analytic import RedMeanClassifier
from tests._synthetic import write_pyramid_tiff


def test_the_largest_candidate_that_fits_is_chosen_and_the_search_stops_at_the_first_that_does_not():
    tried: list[int] = []

    def fits(n: int) -> bool:
        tried.append(n)
        return n <= 40

    assert choose_batch_size((8, 16, 32, 64, 128), fits) == 32
    assert tried == [8, 16, 32, 64]  # 128 is never tried: memory grows with the batch
    assert choose_batch_size((8, 16, 32), lambda n: True) == 32


def test_when_even_the_smallest_candidate_does_not_fit_it_backs_off_by_halves():
    assert choose_batch_size((8, 16), lambda n: n <= 3) == 2
    assert choose_batch_size((8, 16), lambda n: False) == 1


def test_candidates_are_powers_of_two_up_to_the_input_cap():
    assert batch_size_candidates(224) == (8, 16, 32, 64, 128, 256, 445)  # 445: the 256 MiB input cap
    assert batch_size_candidates(224, largest=64) == (8, 16, 32, 64)
    assert batch_size_candidates(1024) == (8, 16, 21)
    assert batch_size_candidates(4096) == (1,)


class _OomAbove(torch.nn.Module):
    """A test double for a GPU's memory: raises the CUDA out-of-memory error for batches
    larger than ``limit`` (no GPU exists here; the error type is what the engine catches)."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test double)")
        return torch.zeros((x.shape[0], 2))


class _OomClassifier:
    class_names = ("a", "b")

    def __init__(self, limit: int) -> None:
        self.preprocessing = Preprocessing(32, 1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
        self.module = _OomAbove(limit)


def test_a_trial_forward_that_runs_out_of_memory_backs_off_to_the_last_size_that_fit():
    classifier = _OomClassifier(limit=100)
    model = _Model(classifier, "cpu", 1)
    chosen = choose_batch_size(batch_size_candidates(32), lambda n: _trial_fits(model, 32, n, None))
    assert chosen == 64
    assert classifier.module.seen == [8, 16, 32, 64, 128]


def test_auto_on_cpu_is_the_measured_default_and_a_given_batch_size_wins():
    classifier = RedMeanClassifier(16, 1.0)
    tiles = np.random.default_rng(0).integers(0, 255, (150, 16, 16, 3), dtype=np.uint8)
    auto, given = EngineStats(), EngineStats()
    out_auto = classify_stream(classifier, tiles.__getitem__, range(150),
                               EngineSettings(batch_size=None, readers=2, device="cpu", cpu_threads=1), stats=auto)
    out_given = classify_stream(classifier, tiles.__getitem__, range(150),
                                EngineSettings(batch_size=16, readers=2, device="cpu", cpu_threads=1), stats=given)
    assert auto.batch_size == CPU_BATCH_SIZE and given.batch_size == 16
    assert (auto.readers, auto.cpu_threads, auto.tiles) == (2, 1, 150)
    np.testing.assert_allclose(out_auto, out_given, atol=1e-6)
    np.testing.assert_allclose(out_auto[:, 0], tiles[..., 0].mean(axis=(1, 2)) / 255, atol=1e-5)


def test_auto_batch_size_travels_as_null_in_run_settings(tmp_path):
    from pipeline import RunSettings

    settings = RunSettings(out_dir=tmp_path, model="m@1", engine=EngineSettings(batch_size=None))
    data = settings.to_json()
    assert data["engine"]["batch_size"] is None
    assert RunSettings.from_json(data).engine.batch_size is None


def test_reader_threads_follow_the_usable_cores_not_the_machine(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    assert usable_cores() == 16 and default_readers() == 16
    assert EngineSettings().cpu_threads == 16
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {3})
    assert usable_cores() == 1 and default_readers() == 2


@pytest.fixture
def small_slide(tmp_path):
    image = np.random.default_rng(1).integers(0, 255, (512, 512, 3), dtype=np.uint8)
    return write_pyramid_tiff(tmp_path / "slide.tiff", image, 0.5, levels=2)


def _job(path, reader: str | None, tmp_path) -> ChunkJob:
    return ChunkJob(slide_id="s-1", slide_path=str(path), backend="auto", mpp_x=0.5, mpp_y=0.5,
                    grid=GridSpec(tile_size_px=64, target_mpp=1.0), heatmap_path=str(tmp_path / "h.zarr"),
                    done_dir=str(tmp_path), engine=EngineSettings(device="cpu"), reader=reader)


def test_a_worker_opens_the_slide_with_the_reader_of_the_run_key(small_slide, tmp_path):
    with open_slide(small_slide) as client:
        direct = client.reader
    with open_slide(small_slide, direct_reader=False) as plain_client:
        plain = plain_client.reader
    assert direct != plain and "+" in direct  # a generic JPEG-tiled TIFF: the direct reader reads it
    for reader in (direct, plain):
        with _job(small_slide, reader, tmp_path).open_slide() as slide:
            assert slide.reader == reader
            assert slide.mpp.mpp_x == 0.5


def test_a_worker_that_cannot_read_the_slide_as_the_run_key_says_refuses_the_chunk(small_slide, tmp_path):
    with pytest.raises(WorkerError, match="the run with openslide\\+jpeg-direct/0") as raised:
        _job(small_slide, "openslide+jpeg-direct/0", tmp_path).open_slide()
    assert raised.value.transient is False and str(tmp_path) not in raised.value.one_line()
    with open_slide(small_slide) as slide:
        check_reader(slide, slide.reader)
        check_reader(slide, None)
        with pytest.raises(WorkerError):
            run_chunks([], slide, RedMeanClassifier(64, 1.0), GridSpec(tile_size_px=64, target_mpp=1.0),
                       tmp_path / "h.zarr", tmp_path, EngineSettings(device="cpu"), reader="tiffslide")


@pytest.mark.slow
def test_reader_processes_give_the_same_heatmap_as_reader_threads(small_slide, tmp_path):
    """Decoding in processes (for many cores, where Pillow's resize holds the GIL) changes
    where tiles are decoded, not their pixels: the same probabilities, bit for bit."""
    from pipeline import make_tile_grid, plan_chunks
    from pipeline._omezarr import create_heatmap, read_heatmap_level0

    classifier = RedMeanClassifier(64, 0.7)  # 0.7 µm/px: a resize, not a stored level
    spec = GridSpec(tile_size_px=64, target_mpp=0.7)
    heatmaps = []
    with open_slide(small_slide) as slide:
        grid = make_tile_grid(*slide.dimensions, 0.5, 0.5, spec)
        tasks = plan_chunks(grid, 2)
        for processes in (0, 2):
            out = tmp_path / f"p{processes}"
            (out / "done").mkdir(parents=True)
            create_heatmap(out / "h.zarr", 2, grid.n_rows, grid.n_cols, 2)
            engine = EngineSettings(batch_size=4, readers=1, reader_processes=processes, device="cpu", cpu_threads=1)
            run_chunks(tasks, slide, classifier, spec, out / "h.zarr", out / "done", engine, reader=slide.reader)
            heatmaps.append(read_heatmap_level0(out / "h.zarr"))
    assert len(tasks) > 1 and heatmaps[0].any()
    from pipeline import _chunk_run

    assert _chunk_run._POOL is not None and _chunk_run._POOL[0] == 2  # the processes did the reading
    np.testing.assert_array_equal(heatmaps[0], heatmaps[1])
