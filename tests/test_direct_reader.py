"""The direct JPEG tile reader: where it applies, pixel agreement with OpenSlide, determinism,
fallback to the backend, and that it is part of a result's key."""

from __future__ import annotations

import io
import math
import shutil
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from pipeline import CorruptSlideError, open_slide
from pipeline._dicom_tiles import DICOM_READER
from pipeline._jpeg_tiles import DIRECT_READER, _decode_pillow
from tests._synthetic import write_pyramid_tiff
from tests.conftest import shared_file

TILE, MPP = 224, 1.0  # the bundled model's tiles: 1 µm/px on a 0.499 µm/px slide, DCT scale 1/2


def _grid(slide, step_um: float = 150.0):
    w_um, h_um = slide.info.width * slide.mpp.mpp_x, slide.info.height * slide.mpp.mpp_y
    return [(x / slide.mpp.mpp_x, y / slide.mpp.mpp_y)
            for y in np.arange(-50.0, h_um - 100, step_um) for x in np.arange(-50.0, w_um - 100, step_um)]


def _mean_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _actually_read(slide, previous, x: float, y: float, d: int):
    """OpenSlide's decode (+ Lanczos d:1) of the region a non-resampled direct read covers: its
    origin snapped to the nearest decoded pixel, ``d`` level-0 pixels each (d x the downsample
    of the level read)."""
    return previous.read_region_at_mpp(math.floor(x / d + 0.5) * d, math.floor(y / d + 0.5) * d, TILE, TILE,
                                       slide.mpp.mpp_x * d)


def test_aperio_jpeg_slide_is_read_directly_and_agrees_with_openslide(cmu_svs):
    """At 1 µm/px on the 0.499 µm/px sample the DCT-halved block (224.4 px) is within 1 % of the
    224 px tile: it is not resampled, and agrees with OpenSlide's decode of the region read."""
    with open_slide(cmu_svs) as direct, open_slide(cmu_svs, direct_reader=False) as previous:
        assert direct.reader == f"openslide+{DIRECT_READER}"
        assert previous.reader == "openslide"
        actual, nominal = [], []
        for x, y in _grid(direct):
            a = direct.read_region_at_mpp(x, y, TILE, TILE, MPP)
            assert a.shape == (TILE, TILE, 3)
            actual.append(_mean_abs(a, _actually_read(direct, previous, x, y, 2)))
            nominal.append(_mean_abs(a, previous.read_region_at_mpp(x, y, TILE, TILE, MPP)))
    # Measured 1.34 mean / 3.4 worst tile (docs/benchmarks.md): DCT-domain halving versus a
    # full decode then a 2:1 Lanczos of the same region; a JPEG pyramid level differs more.
    assert np.mean(actual) < 2.0, np.mean(actual)
    assert max(actual) < 5.0, max(actual)
    # Against the nominal region (up to half a pixel away, 0.2 % larger): measured 6.9 mean;
    # a wrong colour transform or a whole-pixel shift gives far more.
    assert np.mean(nominal) < 10.0, np.mean(nominal)


@pytest.mark.parametrize("mpp", [MPP, 0.9955])  # scale 2.004 and 1.995: both within 1 % of DCT 1/2
def test_a_dct_block_within_one_percent_is_not_resampled(cmu_svs, mpp):
    with open_slide(cmu_svs) as slide:
        direct = slide._direct
        for x, y in [(0.0, 0.0), (700.6, 1201.3), (1500.4, 2500.5), (-30.0, -20.0)]:
            got = slide.read_region_at_mpp(x, y, TILE, TILE, mpp)
            block = direct.read(0, math.floor(x / 2 + 0.5), math.floor(y / 2 + 0.5), TILE, TILE, 2)
            assert np.array_equal(got, block), (x, y)
            # Stitched renderings keep the nominal footprint: resampled, so not the raw block.
            kept = slide.read_region_at_mpp(x, y, TILE, TILE, mpp, nominal_footprint=True)
            assert not np.array_equal(kept, block)


@pytest.mark.parametrize(("mpp", "mean_max", "worst_max"), [(1.2, 2.2, 5.5), (0.8, 1.0, 2.8), (1.6, 2.0, 4.5)])
def test_other_scales_are_resized_and_agree_with_openslide(cmu_svs, mpp, mean_max, worst_max):
    """Remainders outside 1 % are resized (bicubic): against OpenSlide + Lanczos of the same
    region, measured mean / worst tile 1.56 / 3.8 (1.2 µm/px), 0.64 / 1.9 (0.8), 1.31 / 3.3 (1.6)."""
    with open_slide(cmu_svs) as direct, open_slide(cmu_svs, direct_reader=False) as previous:
        diffs = [_mean_abs(direct.read_region_at_mpp(x, y, TILE, TILE, mpp),
                           previous.read_region_at_mpp(x, y, TILE, TILE, mpp)) for x, y in _grid(direct, 200.0)]
    assert np.mean(diffs) < mean_max, np.mean(diffs)
    assert max(diffs) < worst_max, max(diffs)


def test_thumbnails_keep_the_nominal_footprint(cmu_svs):
    with open_slide(cmu_svs) as slide:
        thumb = slide.read_thumbnail(MPP)
        rows, cols = thumb.shape[:2]
        assert np.array_equal(thumb, slide.read_region_at_mpp(0, 0, cols, rows, MPP, nominal_footprint=True))


def test_reads_at_a_stored_level_are_identical_to_openslide(cmu_svs):
    with open_slide(cmu_svs) as slide:
        mpp = slide.mpp.mpp_x
        for x, y, w, h in [(0, 0, 300, 200), (239, 241, 481, 250), (2000, 2800, 400, 300), (-10, -5, 50, 40)]:
            got = slide.read_region_at_mpp(x, y, w, h, mpp)
            assert np.array_equal(got, slide.backend.read_region(x, y, 0, w, h)), (x, y)


def test_direct_reads_are_deterministic_across_opens_and_threads(cmu_svs):
    with open_slide(cmu_svs) as first:
        points = _grid(first, 220.0)
        serial = [first.read_region_at_mpp(x, y, TILE, TILE, MPP) for x, y in points]
    with open_slide(cmu_svs) as second, ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda p: second.read_region_at_mpp(p[0], p[1], TILE, TILE, MPP), points[::-1]))
    assert all(np.array_equal(a, b) for a, b in zip(serial, threaded[::-1], strict=True))


def test_both_decoders_give_the_same_pixels(cmu_svs):
    simplejpeg = pytest.importorskip("simplejpeg")
    with tifffile.TiffFile(cmu_svs) as tif:
        page = tif.pages[0]
        fh = tif.filehandle
        tables = page.jpegtables
        for index in range(0, len(page.dataoffsets), 7):
            fh.seek(page.dataoffsets[index])
            blob = fh.read(page.databytecounts[index])
            data = b"\xff\xd8" + tables[2:-2] + b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00" + blob[2:]
            for d in (1, 2, 4, 8):
                side = 240 // d
                a = _decode_pillow(data, side, side)
                b = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=side, min_width=side)
                assert a.shape == b.shape == (side, side, 3) and np.array_equal(a, b), (index, d)
    # Full-size decodes equal OpenSlide's (the colour marker makes libjpeg keep RGB as RGB).
    full = np.asarray(Image.open(io.BytesIO(data)))
    assert full.shape == (240, 240, 3)


@pytest.mark.parametrize("relative", ["slides/TCGA-CR-7395-crop-jp2k-no-mpp.svs", "synthetic/boxes.tiff"])
def test_other_formats_fall_back_to_the_backend(relative):
    from pipeline import MppPolicy

    with open_slide(shared_file(relative), mpp_policy=MppPolicy.fixed(0.5, 0.5)) as slide:
        assert slide.reader == slide.info.backend
        assert slide.read_region_at_mpp(0, 0, 32, 32, 1.0).shape == (32, 32, 3)


def test_a_damaged_tile_falls_back_to_the_backend_and_fails_the_same_way():
    path = shared_file("bad/unreadable-corrupt-tile.svs")
    with open_slide(path) as direct, open_slide(path, direct_reader=False) as previous:
        w, h = direct.dimensions
        outcomes = []
        for slide in (direct, previous):
            try:
                slide.read_region_at_mpp(0, 0, w // 2, h // 2, 2 * slide.mpp.mpp_x)
                outcomes.append("ok")
            except CorruptSlideError:
                outcomes.append("corrupt")
        assert outcomes[0] == outcomes[1]


def test_disabled_direct_reader():
    from pipeline import Slide
    from pipeline._backend import open_backend
    from pipeline._slide import backend_mpp

    path = shared_file("slides/CMU-1-Small-Region.svs")
    opened = open_backend(path)
    with Slide(opened, backend_mpp(opened, path, None), direct_reader=False) as slide:
        assert slide.reader == "openslide"


def test_a_result_made_with_another_reader_is_not_reused(cmu_svs, tmp_path):
    """The reader is part of the run key: the previous reader's result lives elsewhere."""
    from models import Registry
    from pipeline import AnalysisParams, EngineSettings, GridSettings, ModelInfo, RunSettings, analysis_digest

    model = Registry().load("tissue-qc")
    m = model.manifest
    info = ModelInfo(m.name, m.version, m.weights_sha256, tuple(c.color for c in m.classes))
    settings = RunSettings(out_dir=tmp_path, model="tissue-qc", analysis=AnalysisParams(grid=GridSettings()),
                           engine=EngineSettings(device="cpu"))
    spec = settings.analysis.grid.spec(model.preprocessing, info.ref)
    with open_slide(cmu_svs) as direct, open_slide(cmu_svs, direct_reader=False) as previous:
        keys = {analysis_digest(info, settings.analysis, spec, s.mpp, s.reader) for s in (direct, previous)}
    assert len(keys) == 2
    # The version is in the key: a result of jpeg-direct/1 (always Lanczos) is never resumed.
    assert DIRECT_READER == "jpeg-direct/2" and DICOM_READER == "dicom-jpeg-direct/2"
    old = analysis_digest(info, settings.analysis, spec, previous.mpp, "openslide+jpeg-direct/1")
    assert old not in keys
    # The previous reader's key is unchanged, so its existing results are still found.
    with open_slide(cmu_svs, direct_reader=False) as previous:
        assert analysis_digest(info, settings.analysis, spec, previous.mpp, previous.reader) == analysis_digest(
            info, settings.analysis, spec, previous.mpp, previous.info.backend)


def test_generated_tiled_tiff_is_read_directly_and_agrees_with_openslide(tmp_path):
    """A generic JPEG-tiled pyramid (tifffile, 256 px tiles, 0.25 µm/px): identical at stored
    levels, within the tolerances above where the DCT scale or the resize differs."""
    tissue = np.asarray(Image.open(shared_file("images/he-tumour-1000px.png")).convert("RGB"))
    path = write_pyramid_tiff(tmp_path / "tiled.tiff", np.tile(tissue, (2, 2, 1)), 0.25, levels=3)
    with open_slide(path) as direct, open_slide(path, direct_reader=False) as previous:
        assert direct.reader == f"openslide+{DIRECT_READER}" and all(direct._direct.supports(i) for i in range(3))
        # (µm/px, level-0 px per decoded px when not resampled, largest mean abs diff of a tile;
        # measured 0, 0, 3.5, 0.77, 1.24): 2.0 reads level 2 at DCT 1/2 without resampling.
        for mpp, snapped, limit in [(0.5, 0, 0.0), (1.0, 0, 0.0), (2.0, 8, 5.0), (0.4, 0, 1.5), (0.75, 0, 2.0)]:
            diffs = [_mean_abs(direct.read_region_at_mpp(x, y, TILE, TILE, mpp),
                               _actually_read(direct, previous, x, y, snapped) if snapped
                               else previous.read_region_at_mpp(x, y, TILE, TILE, mpp))
                     for x in (0.0, 612.0, 1500.0) for y in (8.0, 900.0)]
            assert max(diffs) <= limit, (mpp, diffs)


def _lossless_dicom() -> Path:
    return shared_file("dicom/cmu-1-small-region-lossless")


def test_dicom_jpeg_frames_are_read_directly_and_agree_with_openslide(cmu_svs):
    """The lossless DICOM conversion holds the SVS's own JPEG tiles: at a stored level its frames
    decode to OpenSlide's pixels exactly; at 1 µm/px (DCT 1/2, not resampled) like the SVS."""
    with open_slide(_lossless_dicom()) as direct, open_slide(_lossless_dicom(), direct_reader=False) as previous, \
            open_slide(cmu_svs) as svs:
        assert direct.reader == f"openslide+{DICOM_READER}"
        assert previous.reader == "openslide"
        # Its reduced levels say RGB in the header but YCbCr (JFIF) in the stream: OpenSlide and
        # libjpeg disagree there, so they stay with the backend (whose level check rejects them).
        assert direct._direct.supports(0) and not any(direct._direct.supports(i) for i in range(1, 5))
        w, h = direct.dimensions
        mpp = direct.mpp.mpp_x
        for x, y, rw, rh in [(0, 0, w, h), (239, 241, 481, 250), (-10, -5, 50, 40)]:
            got = direct.read_region_at_mpp(x, y, rw, rh, mpp)
            assert np.array_equal(got, previous.backend.read_region(x, y, 0, rw, rh)), (x, y)
        actual = []
        for x, y in _grid(direct):
            a = direct.read_region_at_mpp(x, y, TILE, TILE, MPP)
            assert np.array_equal(a, svs.read_region_at_mpp(x, y, TILE, TILE, MPP))  # the same stored tiles
            actual.append(_mean_abs(a, _actually_read(direct, previous, x, y, 2)))
    assert np.mean(actual) < 2.0 and max(actual) < 5.0, (np.mean(actual), max(actual))


def test_reencoded_dicom_ycbcr_frames_agree_with_openslide():
    path = shared_file("dicom/cmu-1-small-region-reencoded")
    with open_slide(path) as direct, open_slide(path, direct_reader=False) as previous:
        assert direct.reader == f"openslide+{DICOM_READER}"
        w, h = direct.dimensions
        assert np.array_equal(direct.read_region_at_mpp(0, 0, w, h, direct.mpp.mpp_x),
                              previous.backend.read_region(0, 0, 0, w, h))
        diffs = [_mean_abs(direct.read_region_at_mpp(x, y, TILE, TILE, MPP), _actually_read(direct, previous, x, y, 2))
                 for x, y in _grid(direct, 300.0)]
    assert np.mean(diffs) < 2.5, np.mean(diffs)  # measured 1.72


def _copy_level0(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the lossless DICOM folder and the path of its level-0 instance there."""
    folder = shutil.copytree(_lossless_dicom(), tmp_path / "slide")
    level0 = max(folder.iterdir(), key=lambda p: p.stat().st_size)
    return folder, level0


def _pixel_data(path: Path) -> int:
    data = path.read_bytes()
    return data.index(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")


def test_dicom_with_unusual_encapsulation_falls_back_to_the_backend(tmp_path):
    """Two frames in one fragment (fewer fragments than frames): level 0 is not read directly."""
    folder, level0 = _copy_level0(tmp_path)
    data = bytearray(level0.read_bytes())
    bot = _pixel_data(level0) + 12
    first = bot + 8 + struct.unpack("<I", data[bot + 4 : bot + 8])[0]
    first_len = struct.unpack("<I", data[first + 4 : first + 8])[0]
    second_len = struct.unpack("<I", data[first + 8 + first_len + 4 : first + 8 + first_len + 8])[0]
    # Merge the second fragment into the first: its item header becomes part of the first's bytes.
    data[first + 4 : first + 8] = struct.pack("<I", first_len + 8 + second_len)
    level0.write_bytes(bytes(data))
    with open_slide(folder) as slide:
        assert slide._direct is None or not slide._direct.supports(0)
        assert slide.reader in ("openslide", f"openslide+{DICOM_READER}")
        assert slide.read_region_at_mpp(0, 0, 32, 32, 1.0).shape == (32, 32, 3)


def test_a_damaged_dicom_frame_falls_back_to_the_backend_and_fails_the_same_way(tmp_path):
    folder, level0 = _copy_level0(tmp_path)
    data = bytearray(level0.read_bytes())
    bot = _pixel_data(level0) + 12
    first = bot + 8 + struct.unpack("<I", data[bot + 4 : bot + 8])[0]
    length = struct.unpack("<I", data[first + 4 : first + 8])[0]
    body = first + 8
    data[body + length // 2 : body + length // 2 + 64] = b"\xff\xd9" * 32  # cut the first frame's scan
    data[body + 200 : body + 260] = b"\x00" * 60
    level0.write_bytes(bytes(data))
    outcomes = []
    with open_slide(folder) as direct, open_slide(folder, direct_reader=False) as previous:
        assert direct.reader == f"openslide+{DICOM_READER}"
        for slide in (direct, previous):
            try:
                outcomes.append(slide.read_region_at_mpp(0, 0, TILE, TILE, MPP))
            except CorruptSlideError:
                outcomes.append("corrupt")
    if isinstance(outcomes[0], str) or isinstance(outcomes[1], str):
        assert isinstance(outcomes[0], str) and isinstance(outcomes[1], str), outcomes
    else:  # both decoded it (libjpeg recovers from some damage): the backend's pixels, resized
        assert outcomes[0].shape == outcomes[1].shape


def test_identity_of_a_large_file_is_remembered_and_follows_changes(tmp_path, monkeypatch):
    from pipeline import _identity, content_digest, identify_slide

    monkeypatch.setattr(_identity, "DIGEST_CACHE_MIN_BYTES", 1)
    monkeypatch.setattr(_identity, "_memo", {})
    path = tmp_path / "slide.svs"
    path.write_bytes(b"a" * 1000)
    first = identify_slide(path, b"k" * 32)
    assert first.digest == content_digest(path)
    calls = []
    real = _identity._file_digest
    monkeypatch.setattr(_identity, "_file_digest", lambda p: calls.append(p) or real(p))
    monkeypatch.setattr(_identity, "_memo", {})  # a new process: from the site's cache file
    assert identify_slide(path, b"k" * 32) == first and calls == []
    with open(path, "r+b") as fh:  # rewritten in place, same size: a new ctime, hashed again
        fh.write(b"b")
    second = identify_slide(path, b"k" * 32)
    assert calls and second.digest == content_digest(path) != first.digest
