"""TIFF ``deid`` keeps only proven pyramid levels of level 0, whatever the pages call themselves.

A label page that is tiled and carries no "label" word (no description at all, or a
neutral one) must not be copied as a level: its shape does not follow level 0, or it is
not the same kind of image. Generic tiled TIFF and Aperio SVS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openslide
import pytest
import tifffile

from pipeline import DeidentificationError
from privacy import deidentify_slide
from tests._sentinel_slide import SENTINEL, label_image, tissue_image

_LEVEL0 = tissue_image(1024, 768)
_LEVEL1 = _LEVEL0[::2, ::2]
_TILE = {"tile": (128, 128), "photometric": "rgb", "metadata": None}


def _tiles(path: Path, page: int) -> list[bytes]:
    """The stored (compressed) tiles of one page: what a copy of that page would contain."""
    with tifffile.TiffFile(path) as tif, open(path, "rb") as fh:
        found = []
        for offset, count in zip(tif.pages[page].dataoffsets, tif.pages[page].databytecounts, strict=True):
            fh.seek(offset)
            found.append(fh.read(count))
        return found


def _write_generic(path: Path, extra: list[tuple[np.ndarray, dict]]) -> Path:
    with tifffile.TiffWriter(path) as tif:
        tif.write(_LEVEL0, compression="deflate", resolution=(20000, 20000), resolutionunit="CENTIMETER",
                  subfiletype=0, **_TILE)
        tif.write(_LEVEL1, compression="deflate", subfiletype=1, **_TILE)
        for image, options in extra:
            tif.write(image, **{"compression": "deflate", **_TILE, **options})
    return path


def _assert_dropped(src: Path, out: Path, page: int) -> None:
    """No stored tile of ``page`` is in the copy, which reads as the two real levels."""
    data = out.read_bytes()
    assert not [t for t in _tiles(src, page) if len(t) > 64 and t in data]
    with openslide.OpenSlide(src) as a, openslide.OpenSlide(out) as b:
        assert b.level_dimensions == ((1024, 768), (512, 384))
        for level in range(2):
            assert np.array_equal(np.asarray(a.read_region((0, 0), level, (400, 300))),
                                  np.asarray(b.read_region((0, 0), level, (400, 300))))


@pytest.mark.parametrize(
    ("label", "options"),
    [
        (label_image(387, 463), {}),  # portrait: no downsample of a landscape level 0
        (label_image(512, 384)[..., 0], {"photometric": "minisblack"}),  # right shape, not the same kind
    ],
    ids=["shape", "kind"],
)
def test_generic_tiff_tiled_label_without_the_word_is_dropped(tmp_path, label, options):
    src = _write_generic(tmp_path / "slide.tiff", [(label, {"description": "scan 2", **options})])
    assert openslide.OpenSlide.detect_format(src) == "generic-tiff"
    out = tmp_path / "clean.tiff"
    report = deidentify_slide(src, out)
    assert report.levels_kept == 2 and report.dropped == ("non-pyramid page",)
    assert report.level_dimensions == ((1024, 768), (512, 384))
    _assert_dropped(src, out, 2)


def test_generic_tiff_page_at_a_level_already_kept_fails_closed(tmp_path):
    """Two pages at downsample 2: which is the level cannot be decided, so nothing is written."""
    src = _write_generic(tmp_path / "slide.tiff", [(_LEVEL1[::-1].copy(), {"subfiletype": 1})])
    with pytest.raises(DeidentificationError, match="levels differ"):
        deidentify_slide(src, tmp_path / "clean.tiff")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slide.tiff"]


def test_svs_tiled_label_without_the_word_is_dropped(tmp_path):
    src = tmp_path / f"{SENTINEL}.svs"
    header = "Aperio Image Library v12.0.0\r\n"
    level0_desc = f"{header}1024x768 [0,0 1024x768] (128x128) JPEG/RGB Q=70|AppMag = 20|MPP = 0.5"
    with tifffile.TiffWriter(src) as tif:
        tif.write(_LEVEL0, compression="jpeg", description=level0_desc, **_TILE)
        tif.write(_LEVEL0[::4, ::4], compression="jpeg", rowsperstrip=16, photometric="rgb", metadata=None,
                  description=f"{header}1024x768 -> 256x192 - |AppMag = 20|MPP = 0.5")
        tif.write(_LEVEL1, compression="jpeg", description=f"{header}1024x768 -> 512x384 JPEG/RGB Q=70", **_TILE)
        tif.write(label_image(387, 463), compression="lzw", subfiletype=1, description=f"{header}387x463",
                  **_TILE)
    with openslide.OpenSlide(src) as slide:
        assert slide.properties["openslide.vendor"] == "aperio" and slide.level_count == 3
    out = tmp_path / "clean.svs"
    report = deidentify_slide(src, out)
    assert report.levels_kept == 2 and report.dropped == ("thumbnail", "non-pyramid page")
    _assert_dropped(src, out, 3)
    assert SENTINEL.encode() not in out.read_bytes()
    with openslide.OpenSlide(out) as slide:
        assert slide.properties["openslide.mpp-x"] == "0.5" and dict(slide.associated_images) == {}
