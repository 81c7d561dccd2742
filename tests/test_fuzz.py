"""Fuzzing slide opening and reading: only ``WsiflowError`` may escape; no crash, no hang.

Mutations of real slides (byte flips, flips inside tile data, truncations, and targeted
changes to TIFF IFD entries and tile offset/size tables) run in a child process
(tests/_fuzz.FuzzWorker), so a native crash or a hang is reported as a failure instead of
killing pytest. Bounded for ``make test`` (derandomized, ~100 examples in all); the long
exploratory run is ``python -m bench.fuzz_slides``. Inputs the long run found are kept
below as regression cases, described as mutations (mutated real slides are not committed).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests._fuzz import (
    INTERESTING_U32,
    STRUCTURAL_TAGS,
    FuzzWorker,
    TiffEntry,
    flip_bytes,
    set_array_item,
    set_entry_field,
    tiff_entries,
    tile_spans,
    truncate,
)
from tests._synthetic import write_pyramid_tiff
from tests.conftest import shared_file

CASE_TIMEOUT_S = 60.0
"""A case slower than this counts as a hang. Damaged headers may legitimately claim a large
image without a pyramid, whose thumbnail takes seconds; an endless loop takes forever."""
def fuzz_settings(max_examples: int) -> settings:
    """Bounded, reproducible settings for the fuzz tests."""
    return settings(
        max_examples=max_examples,
        derandomize=True,  # the same cases on every run: ``make test`` must not be flaky
        deadline=None,  # the child's CASE_TIMEOUT_S is the per-case limit
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.differing_executors],
        database=None,
    )


class Seed:
    """A seed slide: its bytes, IFD entries and level-0 tile spans."""

    def __init__(self, data: bytes, suffix: str) -> None:
        self.data = data
        self.suffix = suffix
        self.entries = tiff_entries(data)
        self.structural = [e for e in self.entries if e.code in STRUCTURAL_TAGS] or self.entries
        self.tiles = tile_spans(data)

    def entry(self, ifd: int, code: int) -> TiffEntry:
        return next(e for e in self.entries if e.ifd == ifd and e.code == code)


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory):
    with FuzzWorker(timeout=CASE_TIMEOUT_S, workdir=tmp_path_factory.mktemp("fuzz")) as w:
        yield w


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    rng = np.random.default_rng(0)
    image = np.full((600, 800, 3), 243, np.uint8)
    image[100:500, 150:650] = rng.integers(120, 220, (400, 500, 3), dtype=np.uint8)
    path = write_pyramid_tiff(tmp_path_factory.mktemp("seed") / "generated.tiff", image, 0.5, levels=3, tile_px=128)
    return Seed(path.read_bytes(), ".tiff")


def _seed(relative: str) -> Seed:
    path = shared_file(relative)
    return Seed(path.read_bytes(), path.suffix)


@st.composite
def mutated(draw: st.DrawFn, seed: Seed) -> bytes:
    """1-3 stacked mutations of the seed's bytes."""
    data = seed.data
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "flip-tile", "truncate", "entry", "array", "array"]))
        if kind == "flip":
            n = draw(st.integers(1, 8))
            data = flip_bytes(data, draw(st.lists(st.integers(0, len(data) - 1), min_size=n, max_size=n)),
                              draw(st.lists(st.integers(1, 255), min_size=n, max_size=n)))
        elif kind == "flip-tile" and seed.tiles:
            offset, count = draw(st.sampled_from(seed.tiles))
            at = draw(st.lists(st.integers(offset, offset + count - 1), min_size=1, max_size=6))
            data = flip_bytes(data, at, draw(st.lists(st.integers(1, 255), min_size=len(at), max_size=len(at))))
        elif kind == "truncate":
            data = truncate(data, draw(st.integers(0, len(data) - 1)))
        elif kind == "entry":
            entry = draw(st.sampled_from(seed.structural))
            field = draw(st.sampled_from(["count", "value", "dtype"]))
            value = draw(st.integers(0, 19)) if field == "dtype" else draw(
                st.sampled_from(INTERESTING_U32) | st.integers(0, 2**32 - 1) | st.just(len(seed.data)))
            data = set_entry_field(data, entry, field, value)
        else:
            entry = draw(st.sampled_from(seed.structural))
            value = draw(st.sampled_from(INTERESTING_U32) | st.integers(0, 2**32 - 1) | st.just(len(seed.data)))
            data = set_array_item(data, entry, draw(st.integers(0, max(entry.count - 1, 0))), value)
    return data


def _check(worker: FuzzWorker, data: bytes, suffix: str, backend: str) -> None:
    result = worker.run(data, suffix, backend)
    assert not result.violates_contract, f"{result.outcome}: {result.detail}\n{result.traceback}"


BACKENDS = st.sampled_from(["auto", "tiffslide", "openslide"])


@pytest.mark.slow
@fuzz_settings(40)
@given(data=st.data(), backend=BACKENDS)
def test_fuzz_real_aperio_slide(worker, data, backend):
    seed = _seed("slides/CMU-1-Small-Region.svs")
    _check(worker, data.draw(mutated(seed)), seed.suffix, backend)


@pytest.mark.parametrize("relative", ["slides/small-16px.svs", "bad/unreadable-corrupt-tile.svs"])
@fuzz_settings(25)
@given(data=st.data(), backend=BACKENDS)
def test_fuzz_small_real_slides(worker, relative, data, backend):
    seed = _seed(relative)
    _check(worker, data.draw(mutated(seed)), seed.suffix, backend)


@pytest.mark.slow
@fuzz_settings(40)
@given(data=st.data(), backend=BACKENDS)
def test_fuzz_generated_pyramid_tiff(worker, generated, data, backend):
    _check(worker, data.draw(mutated(generated)), generated.suffix, backend)


# --- regressions found by bench/fuzz_slides.py (each escaped or crashed before the fix) ---

REGRESSIONS = [
    # OpenSlide g_malloc abort (SIGABRT) on a tile claimed 2**31-1 px wide -> tile-size sanity check.
    ("generated", 2, 322, "array", 0x7FFFFFFF, "openslide"),
    # OpenSlide g_malloc abort on tile byte counts read as 64-bit (type LONG8) -> layout check.
    ("slides/CMU-1-Small-Region.svs", 0, 325, "dtype", 16, "openslide"),
    # numpy MemoryError (344 PiB) reading a level 2**31-1 px wide -> level-size sanity check.
    ("generated", 0, 257, "array", 0x7FFFFFFF, "auto"),
    # tifffile ZeroDivisionError for a zero tile width.
    ("bad/unreadable-corrupt-tile.svs", 0, 322, "value", 0, "auto"),
    # tifffile ZeroDivisionError for an ImageLength with an absurd count.
    ("generated", 1, 257, "count", 0xFFFFFFFF, "tiffslide"),
    # zarr KeyError '0.1.0' for tile byte counts pointing at the end of the file.
    ("slides/CMU-1-Small-Region.svs", 0, 325, "value", 1938954, "tiffslide"),
    # tiffslide ZeroDivisionError for a zero ImageWidth in the Aperio level table.
    ("slides/CMU-1-Small-Region.svs", 0, 256, "array", 0, "auto"),
    # tiffslide AttributeError ('int' object has no attribute 'name') for ResolutionUnit 77.
    ("generated", 0, 296, "array", 77, "tiffslide"),
]


@pytest.mark.parametrize(("seed_name", "ifd", "tag", "field", "value", "backend"), REGRESSIONS)
def test_fuzz_regressions(worker, generated, seed_name, ifd, tag, field, value, backend):
    seed = generated if seed_name == "generated" else _seed(seed_name)
    entry = seed.entry(ifd, tag)
    data = (set_array_item(seed.data, entry, 0, value) if field == "array"
            else set_entry_field(seed.data, entry, field, value))
    result = worker.run(data, seed.suffix, backend)
    assert not result.violates_contract, f"{result.outcome}: {result.detail}\n{result.traceback}"


def test_the_harness_sees_escapes_crashes_and_hangs(tmp_path: Path):
    """The guard itself works: a segfault and a hang in the child are reported, not suffered."""
    from tests._fuzz import CaseResult

    assert CaseResult("escaped").violates_contract and not CaseResult("wsiflow-error").violates_contract
    with FuzzWorker(timeout=3.0, workdir=tmp_path) as w:
        assert w.run(b"not a slide", ".svs").outcome == "wsiflow-error"
        w._proc.send_signal(11)  # type: ignore[union-attr]  # as if a decoder had segfaulted
        assert w.run(b"II*\0", ".tiff").outcome in ("crash", "wsiflow-error")
        assert w.run(b"not a slide", ".svs").outcome == "wsiflow-error"  # restarted
