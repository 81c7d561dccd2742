"""Fuzz harness for slide opening and reading, shared by tests/test_fuzz.py and bench/fuzz_slides.py.

The contract under test: whatever bytes a slide file holds, :func:`pipeline.open_slide` and
the reads wsiflow does (thumbnail, regions at a few levels and µm/px) either return or raise
a :class:`pipeline.WsiflowError`; nothing else escapes, nothing crashes the process, nothing
hangs. Cases run in a long-lived child process (:class:`FuzzWorker`) so a native crash or a
hang is observed (and the child restarted) instead of taking the test run down.

Run as ``python -m tests._fuzz --serve`` it is that child: it reads one JSON request per line
on stdin (``{"path", "backend"}``) and answers one JSON line on stdout.
"""

from __future__ import annotations

import json
import os
import select
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

__all__ = [
    "CaseResult",
    "FuzzWorker",
    "TiffEntry",
    "exercise_slide",
    "run_case_in_process",
    "tiff_entries",
    "tile_spans",
    "flip_bytes",
    "truncate",
    "set_entry_field",
    "set_array_item",
    "random_mutation",
    "INTERESTING_U32",
]

ROOT = Path(__file__).resolve().parents[1]
Outcome = Literal["ok", "wsiflow-error", "escaped", "crash", "hang"]
_THUMB_MAX_PX = 256
_REGION_PX = 64
_CHILD_MEMORY_BYTES = 8 << 30  # absurd dimensions must fail cleanly, not eat the machine

INTERESTING_U32 = (0, 1, 2, 7, 8, 15, 16, 255, 256, 4095, 65535, 65536, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
"""Values that tend to break size and offset arithmetic."""


@dataclass(frozen=True)
class CaseResult:
    """What one case did. ``detail`` is the error kind (wsiflow), type and message (escaped),
    the signal/exit code (crash) or the limit (hang)."""

    outcome: Outcome
    detail: str = ""
    traceback: str = ""
    seconds: float = 0.0

    @property
    def violates_contract(self) -> bool:
        return self.outcome in ("escaped", "crash", "hang")


# --- what is exercised ------------------------------------------------------------------


def exercise_slide(path: Path, backend: str = "auto") -> None:
    """Open ``path`` and read what an analysis reads; raise whatever the library raises."""
    import math

    from pipeline import MissingMppError, MppPolicy, open_slide

    try:
        slide = open_slide(path, backend=backend)  # type: ignore[arg-type]
    except MissingMppError:
        # Still exercise the pixel paths: give a plausible scale, as --mpp would.
        slide = open_slide(path, backend=backend, mpp_policy=MppPolicy.fixed(0.5, 0.5))  # type: ignore[arg-type]
    with slide:
        width, height = slide.dimensions
        extent_um = max(width * slide.mpp.mpp_x, height * slide.mpp.mpp_y)
        thumb_mpp = max(extent_um / _THUMB_MAX_PX, slide.mpp.mpp_x, slide.mpp.mpp_y)
        slide.read_thumbnail(thumb_mpp)
        levels = len(slide.info.level_dimensions)
        for level in sorted({0, levels - 1}):
            lw, lh = slide.info.level_dimensions[level]
            ds = slide.info.level_downsamples[level]
            for lx, ly in ((0, 0), (lw // 2, lh // 2), (lw - 1, lh - 1)):
                slide.read_region(math.floor(lx * ds), math.floor(ly * ds), level, _REGION_PX, _REGION_PX)
        for factor in (1.0, 2.0, 4.5):
            slide.read_region_at_mpp(width / 3, height / 3, _REGION_PX, _REGION_PX, slide.mpp.mpp_x * factor)


def run_case_in_process(path: Path, backend: str = "auto") -> CaseResult:
    """:func:`exercise_slide` in this process, the exception classified (no crash/hang guard)."""
    from pipeline import WsiflowError

    start = time.perf_counter()
    try:
        exercise_slide(path, backend)
    except WsiflowError as exc:
        return CaseResult("wsiflow-error", exc.kind, seconds=time.perf_counter() - start)
    except BaseException as exc:  # noqa: BLE001 - the harness classifies everything that escapes
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        return CaseResult(
            "escaped", f"{type(exc).__module__}.{type(exc).__name__}: {str(exc)[:300]}",
            traceback.format_exc(limit=12), time.perf_counter() - start,
        )
    return CaseResult("ok", seconds=time.perf_counter() - start)


# --- the child process --------------------------------------------------------------------


def _serve() -> None:
    """Answer requests on stdin until it closes (the child side of :class:`FuzzWorker`)."""
    import logging
    import resource

    logging.disable(logging.WARNING)  # expected warnings about broken levels would flood stderr
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _CHILD_MEMORY_BYTES if hard == resource.RLIM_INFINITY else min(hard, _CHILD_MEMORY_BYTES)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    import pipeline  # noqa: F401 - import before the first request so its time is not a case's

    out = sys.stdout
    sys.stdout = sys.stderr  # stray prints from libraries must not corrupt the protocol
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        result = run_case_in_process(Path(request["path"]), request.get("backend", "auto"))
        out.write(json.dumps(asdict(result)) + "\n")
        out.flush()


class FuzzWorker:
    """A child process that runs cases; restarted after a crash or a hang.

    Use as a context manager. :meth:`run` writes the bytes to a temp file, sends it to the
    child and waits at most ``timeout`` seconds.
    """

    def __init__(self, timeout: float = 20.0, workdir: Path | None = None) -> None:
        self.timeout = timeout
        self._own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="wsiflow-fuzz-")) if workdir is None else workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._proc: subprocess.Popen[str] | None = None
        self.restarts = 0

    def __enter__(self) -> FuzzWorker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests._fuzz", "--serve"], cwd=ROOT, env=env, text=True,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        if self._readline(proc, 120.0) != "ready":
            proc.kill()
            proc.wait()
            raise RuntimeError("the fuzz child did not start")
        return proc

    @staticmethod
    def _readline(proc: subprocess.Popen[str], timeout: float) -> str | None:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = proc.stdout.readline()
        return line.strip() if line else None

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def close(self) -> None:
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
        self._stop()
        if self._own_dir:
            import shutil

            shutil.rmtree(self.workdir, ignore_errors=True)

    def run(self, data: bytes, suffix: str, backend: str = "auto") -> CaseResult:
        """Run one case; ``crash``/``hang`` when the child died or went past the timeout."""
        if self._proc is None or self._proc.poll() is not None:
            self._proc = self._start()
        path = self.workdir / f"case{suffix}"
        path.write_bytes(data)
        start = time.perf_counter()
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps({"path": str(path), "backend": backend}) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass
        line = self._readline(self._proc, self.timeout)
        elapsed = time.perf_counter() - start
        if line:
            return CaseResult(**json.loads(line))
        try:
            # No answer: either the child died (its pipe closed; reap it) or it is stuck.
            code: int | None = self._proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            code = None
        if code is None:
            self._stop()
            self.restarts += 1
            return CaseResult("hang", f"no answer within {self.timeout:g} s", seconds=elapsed)
        self._stop()
        self.restarts += 1
        detail = f"signal {-code}" if code < 0 else f"exit code {code}"
        return CaseResult("crash", detail, seconds=elapsed)


# --- mutations ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TiffEntry:
    """One IFD entry of a TIFF file: where it is and what it says."""

    ifd: int
    code: int
    dtype: int
    count: int
    entry_offset: int
    """File offset of the entry (tag code, type, count, value-or-offset)."""
    value_offset: int
    """File offset of the value (inside the entry when it fits)."""
    bigtiff: bool
    byteorder: str


def tiff_entries(data: bytes) -> list[TiffEntry]:
    """Every IFD entry of every page (pyramid levels, label, macro...) of a TIFF in memory."""
    import io

    import tifffile

    entries: list[TiffEntry] = []
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        bigtiff = tif.is_bigtiff
        byteorder = tif.byteorder
        for index, page in enumerate(tif.pages):
            for tag in page.tags.values():  # type: ignore[union-attr]
                entries.append(TiffEntry(index, int(tag.code), int(tag.dtype), int(tag.count), int(tag.offset), int(tag.valueoffset),
                                         bigtiff, byteorder))
    return entries


def tile_spans(data: bytes, page: int = 0) -> list[tuple[int, int]]:
    """(offset, byte count) of each stored tile or strip of a TIFF page."""
    import io

    import tifffile

    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        p = tif.pages[page]
        return [(int(o), int(n)) for o, n in zip(p.dataoffsets, p.databytecounts) if n]  # type: ignore[union-attr]


def flip_bytes(data: bytes, positions: list[int], masks: list[int]) -> bytes:
    """XOR ``masks`` into ``data`` at ``positions`` (taken modulo the length)."""
    out = bytearray(data)
    if not out:
        return data
    for pos, mask in zip(positions, masks):
        out[pos % len(out)] ^= (mask & 0xFF) or 0xFF
    return bytes(out)


def truncate(data: bytes, length: int) -> bytes:
    return data[: max(0, min(length, len(data)))]


def set_entry_field(data: bytes, entry: TiffEntry, field: Literal["dtype", "count", "value"], value: int) -> bytes:
    """Overwrite the type, count or first value/offset word of an IFD entry."""
    order = entry.byteorder
    if field == "dtype":
        fmt, at = order + "H", entry.entry_offset + 2
    elif field == "count":
        fmt, at = order + ("Q" if entry.bigtiff else "I"), entry.entry_offset + 4
    else:
        fmt, at = order + ("Q" if entry.bigtiff else "I"), entry.entry_offset + (12 if entry.bigtiff else 8)
    size = struct.calcsize(fmt)
    value &= (1 << (8 * size)) - 1
    out = bytearray(data)
    out[at : at + size] = struct.pack(fmt, value)
    return bytes(out)


_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 6: 1, 7: 1, 8: 2, 9: 4, 11: 4, 12: 8, 16: 8, 17: 8, 13: 4, 18: 8}
_FMT = {2: "H", 4: "I", 8: "Q"}


def set_array_item(data: bytes, entry: TiffEntry, index: int, value: int) -> bytes:
    """Overwrite item ``index`` (modulo the count) of an integer array value, e.g. one
    tile's offset or byte count, or the width in ImageWidth."""
    size = _SIZES.get(entry.dtype, 4)
    if entry.count < 1 or size not in _FMT:
        return data
    at = entry.value_offset + (index % entry.count) * size
    if at + size > len(data):
        return data
    value &= (1 << (8 * size)) - 1
    out = bytearray(data)
    out[at : at + size] = struct.pack(entry.byteorder + _FMT[size], value)
    return bytes(out)


# Tags whose values drive geometry, offsets and decoding: mutating them finds the nasty cases.
STRUCTURAL_TAGS = frozenset({
    256, 257, 258, 259, 262, 273, 277, 278, 279, 284, 322, 323, 324, 325, 330, 347, 530, 532, 254,
})


def random_mutation(rng: object, data: bytes, entries: list[TiffEntry]) -> tuple[bytes, str]:
    """One random mutation (for the long bench): the new bytes and a replayable description."""
    import random

    r: random.Random = rng  # type: ignore[assignment]
    kind = r.choice(["flip", "flip", "truncate", "entry", "entry", "array", "array"]) if entries else "flip"
    if kind == "flip":
        n = r.randint(1, 16)
        positions = [r.randrange(len(data)) for _ in range(n)]
        masks = [r.randrange(1, 256) for _ in range(n)]
        return flip_bytes(data, positions, masks), f"flip positions={positions} masks={masks}"
    if kind == "truncate":
        length = r.randrange(len(data))
        return truncate(data, length), f"truncate length={length}"
    structural = [e for e in entries if e.code in STRUCTURAL_TAGS] or entries
    entry = r.choice(structural)
    value = r.choice(list(INTERESTING_U32) + [r.randrange(1 << 32), len(data), len(data) - 1, entry.count + 1])
    if kind == "entry":
        field = r.choice(["count", "value", "value", "dtype"])
        if field == "dtype":
            value = r.randrange(0, 20)
        return set_entry_field(data, entry, field, value), (
            f"entry ifd={entry.ifd} tag={entry.code} field={field} value={value}")
    index = r.randrange(max(entry.count, 1))
    return set_array_item(data, entry, index, value), (
        f"array ifd={entry.ifd} tag={entry.code} index={index} value={value}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    else:
        sys.exit("usage: python -m tests._fuzz --serve")
