"""Batched inference: reader threads prefetch and decode tiles while the model runs.

The engine knows nothing about slides or registries: it gets a classifier and a function
that reads tile ``i`` (RGB uint8 at the classifier's tile size). Readers run in a bounded
thread pool (OpenSlide and JPEG decoding release the GIL), at most ``prefetch_batches``
batches ahead of the model, so memory stays bounded whatever the slide size.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from ._classifier import PatchClassifier
from ._errors import ConfigError

if TYPE_CHECKING:
    import torch

__all__ = ["EngineSettings", "EngineStats", "resolve_device", "classify_stream", "classify_tiles", "default_readers",
           "usable_cores", "batch_size_for", "batch_size_candidates", "choose_batch_size", "CPU_BATCH_SIZE",
           "MAX_BATCH_INPUT_BYTES", "MAX_TILE_INPUT_BYTES", "DEFAULT_SLIDE_TIME_LIMIT_S"]

Device = Literal["auto", "cpu", "cuda"]

_log = logging.getLogger(__name__)

MAX_BATCH_INPUT_BYTES = 256 << 20
"""Most bytes of a batch's input tensor (float32, N x 3 x tile x tile): 445 tiles of 224 px,
21 of 1024 px, 1 of 4096 px. A smaller ``batch_size`` is used for larger tiles: a CNN's first
activations are several times its input, so this keeps a batch within a few GiB."""
MAX_TILE_INPUT_BYTES = 1 << 30
"""Most bytes of one tile's input tensor (a 9,459 px tile); a model with larger tiles is refused."""
DEFAULT_SLIDE_TIME_LIMIT_S = 6 * 3600.0
"""One slide's analysis may take this long by default (``engine.slide_time_limit_s``)."""


MAX_DEFAULT_READERS = 32
"""Most reader threads chosen by default (a 16-core GPU server gets 16)."""
CPU_BATCH_SIZE = 64
"""The batch size on CPU when none is given. Measured for tissue-qc on 2 cores (2026-12-01,
one run): 8 -> 229, 16 -> 298, 28 -> 339, 64 -> 315, 128 -> 269 tiles/s; 32-64 is the plateau,
and 64 was the fixed default before, so CPU results do not change."""
AUTO_BATCH_MAX = 512
"""Largest batch an automatic choice tries on a GPU (throughput is flat well before)."""
AUTO_BATCH_MEMORY_FRACTION = 0.7
"""An automatic GPU batch may take this much of the memory free when it is chosen (its peak
in a trial forward, plus the next batch's input already copied)."""


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, e.g. a container's or ``taskset``'s
    share), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity on this platform
        return os.cpu_count() or 1


def default_readers() -> int:
    """Tile reader threads by default: one per usable core, at least 2, at most
    :data:`MAX_DEFAULT_READERS`. On CPU the model's torch threads use the same cores: with
    2 cores, 2 torch threads and 2 readers time-share them best (``bench/bench_e2e.py
    --sweep``: 1.03 x the shared-cores bound; 1 torch thread 0.63-0.72 x, 1 reader 0.90 x)."""
    return max(2, min(MAX_DEFAULT_READERS, usable_cores()))


@dataclass(frozen=True)
class EngineSettings:
    """How tiles are read and batched; never changes a result's values."""

    batch_size: int | None = 64
    """Tiles per model call; None: chosen by the engine (:data:`CPU_BATCH_SIZE` on CPU; on a
    GPU the largest that fits, from trial forwards: :func:`choose_batch_size`). The size used
    is in :class:`EngineStats`. Either way capped by :func:`batch_size_for`."""
    readers: int = field(default_factory=default_readers)
    """Reader threads decoding tiles ahead of the model."""
    prefetch_batches: int = 2
    reader_processes: int = 0
    """0: the reader threads decode tiles in this process. N > 0: N processes decode them (each
    opens the slide once, with the run's reader) and the reader threads only wait for them;
    for many cores where decoding holds the GIL (Pillow 13's Lanczos resize of a small
    tile does not scale past one thread). Costs a process start-up (~1-3 s) per run."""
    device: Device = "auto"
    cpu_threads: int = field(default_factory=usable_cores)
    """torch threads on CPU (default: the usable cores). Fixed by the client and shipped with each chunk, so workers
    (where Dask sets OMP_NUM_THREADS=1) compute with the same thread count, hence the
    same floating-point results, as a local run."""
    slide_time_limit_s: float | None = DEFAULT_SLIDE_TIME_LIMIT_S
    """Wall time one slide's analysis may take (after the model is loaded); past it the slide
    fails with a ``worker`` error and its finished chunks are kept. None: no limit."""

    def __post_init__(self) -> None:
        if self.slide_time_limit_s is not None and not (
            math.isfinite(self.slide_time_limit_s) and self.slide_time_limit_s > 0
        ):
            raise ConfigError(
                f"slide_time_limit_s = {self.slide_time_limit_s!r} must be a positive number of seconds",
                hint="use null (or --slide-time-limit 0) for no limit",
            )
        if (self.batch_size is not None and self.batch_size < 1) or min(
            self.readers, self.prefetch_batches, self.cpu_threads
        ) < 1:
            raise ConfigError(
                f"batch_size ({self.batch_size}), readers ({self.readers}) and prefetch_batches "
                f"({self.prefetch_batches}) must be at least 1"
            )
        if self.reader_processes < 0:
            raise ConfigError(f"reader_processes ({self.reader_processes}) must be 0 (threads only) or more")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device {self.device!r} is not auto, cpu or cuda")


def resolve_device(device: Device) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``; ``cuda`` without one is an error."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is usable", hint="use --device cpu or auto")
    return device


class _Model:
    """The classifier placed on a device, with the fast paths of that device."""

    def __init__(self, classifier: PatchClassifier, device: str, cpu_threads: int) -> None:
        import torch

        self.device = torch.device(device)
        if self.device.type == "cpu" and torch.get_num_threads() != cpu_threads:
            torch.set_num_threads(cpu_threads)
        self.cuda = self.device.type == "cuda"
        module = classifier.module.eval().to(self.device)
        if self.cuda:
            module = module.to(memory_format=torch.channels_last)
            self.autocast_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.module = module
        prep = classifier.preprocessing
        self.mean = torch.tensor(prep.mean, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(prep.std, dtype=torch.float32, device=self.device).view(1, 3, 1, 1) * 255

    def __call__(self, tiles: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            batch = torch.from_numpy(tiles)
            if self.cuda:
                batch = batch.pin_memory().to(self.device, non_blocking=True)
            return self.forward(batch).cpu().numpy()

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        """Probabilities (float32, on the device) of uint8 NHWC tiles already on the device."""
        import torch

        with torch.inference_mode():
            # uint8 NHWC -> float NCHW, normalised on the device (less host work and traffic).
            x = batch.permute(0, 3, 1, 2).float().sub_(self.mean).div_(self.std)
            if self.cuda:
                x = x.contiguous(memory_format=torch.channels_last)
                with torch.autocast("cuda", dtype=self.autocast_dtype):
                    logits = self.module(x)
            else:
                logits = self.module(x)
            return torch.softmax(logits.float(), dim=1)


class _CudaPipeline:
    """Overlaps a batch's host-to-device copy, the previous batch's compute and the host's
    wait for reader threads: two pinned host buffers, a copy stream, events between them.

    The model runs the same kernels on the same batches as without it (same results); only
    when copies and compute happen changes. Also sums the GPU's busy time (CUDA events).
    """

    def __init__(self, model: _Model, batch_size: int, tile: int) -> None:
        import torch

        self._torch = torch
        self._model = model
        self._copy_stream = torch.cuda.Stream(device=model.device)
        shape = (batch_size, tile, tile, 3)
        self._host = [torch.empty(shape, dtype=torch.uint8).pin_memory() for _ in range(2)]
        self._copied: list[torch.cuda.Event | None] = [None, None]
        self._slot = 0
        self.busy_s = 0.0

    def host_buffer(self, n: int) -> np.ndarray:
        """The next pinned buffer (as numpy, ``n`` tiles), once its previous copy is done."""
        event = self._copied[self._slot]
        if event is not None:
            event.synchronize()
        return self._host[self._slot][:n].numpy()

    def submit(self, n: int) -> tuple[torch.Tensor, torch.cuda.Event, torch.cuda.Event, torch.cuda.Event]:
        """Copy the filled buffer's ``n`` tiles and classify them, without waiting."""
        torch = self._torch
        slot, self._slot = self._slot, self._slot ^ 1
        compute = torch.cuda.current_stream(self._model.device)
        with torch.cuda.stream(self._copy_stream):
            on_device = self._host[slot][:n].to(self._model.device, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(self._copy_stream)
        self._copied[slot] = copied
        compute.wait_event(copied)
        on_device.record_stream(compute)  # its memory is used by the compute stream
        started, finished = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        started.record(compute)
        probabilities = self._model.forward(on_device)
        finished.record(compute)
        result = torch.empty(probabilities.shape, dtype=probabilities.dtype, pin_memory=True)
        result.copy_(probabilities, non_blocking=True)
        done = torch.cuda.Event()
        done.record(compute)
        return result, done, started, finished

    def collect(self, handle: tuple[torch.Tensor, torch.cuda.Event, torch.cuda.Event, torch.cuda.Event]) -> np.ndarray:
        result, done, started, finished = handle
        done.synchronize()
        self.busy_s += started.elapsed_time(finished) / 1000
        return result.numpy()


@dataclass
class EngineStats:
    """What limited a :func:`classify_stream` call (filled in when one is passed)."""

    tiles: int = 0
    wall_s: float = 0.0
    wait_for_readers_s: float = 0.0
    """Time the model loop waited for reader threads (the reader bound shows here)."""
    gpu_busy_s: float | None = None
    """Time the GPU spent computing (CUDA events), None on CPU."""
    batch_size: int = 0
    """The batch size used (the settings', or the one chosen when they leave it to the engine)."""
    readers: int = 0
    cpu_threads: int = 0


_REDUCED: set[tuple[int, int]] = set()


def batch_size_for(tile_size_px: int, batch_size: int) -> int:
    """``batch_size``, reduced so that a batch's input tensor stays within
    :data:`MAX_BATCH_INPUT_BYTES`; :class:`ConfigError` when one tile exceeds
    :data:`MAX_TILE_INPUT_BYTES`. Depends only on its arguments, so a resumed run batches
    (and computes) exactly as the first one did."""
    per_tile = 3 * 4 * tile_size_px * tile_size_px
    if per_tile > MAX_TILE_INPUT_BYTES:
        largest = math.isqrt(MAX_TILE_INPUT_BYTES // 12)
        raise ConfigError(
            f"the model takes {tile_size_px:,} px tiles: one tile is {per_tile / 2**30:.1f} GiB as float32, "
            f"more than the {MAX_TILE_INPUT_BYTES / 2**30:g} GiB a tile may take",
            hint=f"use a model whose tiles are at most {largest:,} px",
        )
    fits = max(1, MAX_BATCH_INPUT_BYTES // per_tile)
    if fits >= batch_size:
        return batch_size
    if (tile_size_px, batch_size) not in _REDUCED:  # once per process, not per chunk
        _REDUCED.add((tile_size_px, batch_size))
        _log.info("batch size %d reduced to %d for %d px tiles (a batch's input stays within %d MiB)",
                  batch_size, fits, tile_size_px, MAX_BATCH_INPUT_BYTES >> 20)
    return fits


def batch_size_candidates(tile_size_px: int, largest: int = AUTO_BATCH_MAX) -> tuple[int, ...]:
    """Sizes an automatic choice tries, smallest first: powers of two from 8 up to
    ``largest`` and the input cap of :func:`batch_size_for` (the cap itself when it is not
    a power of two); just the cap when it is below 8."""
    cap = batch_size_for(tile_size_px, largest)
    sizes = [n for n in (2**k for k in range(3, 16)) if n <= cap]
    if not sizes or sizes[-1] != cap:
        sizes.append(cap)
    return tuple(sizes)


def choose_batch_size(candidates: Sequence[int], fits: Callable[[int], bool]) -> int:
    """The largest of ``candidates`` (ascending) that ``fits``, trying them in order and
    stopping at the first that does not (memory grows with the batch). When even the
    smallest does not fit: halving down from it, the first that fits; 1 when none does
    (the model then fails on its own, with its own error, as with any batch size)."""
    chosen = None
    for n in candidates:
        if not fits(n):
            break
        chosen = n
    if chosen is not None:
        return chosen
    n = candidates[0] // 2 if candidates else 0
    while n > 1 and not fits(n):
        n //= 2
    return max(1, n)


def _trial_fits(model: _Model, tile: int, n: int, budget_bytes: int | None) -> bool:
    """Whether a batch of ``n`` tiles runs on ``model``'s device: no out-of-memory error and,
    on a GPU, its peak memory plus the next batch's input within ``budget_bytes``."""
    import torch

    on_device = None
    try:
        if model.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(model.device)
            before = torch.cuda.memory_allocated(model.device)
        on_device = torch.zeros((n, tile, tile, 3), dtype=torch.uint8, device=model.device)
        model.forward(on_device)
        if model.cuda:
            torch.cuda.synchronize(model.device)
            peak = torch.cuda.max_memory_allocated(model.device) - before
            return budget_bytes is None or peak + n * tile * tile * 3 <= budget_bytes
        return True
    except torch.cuda.OutOfMemoryError:
        return False
    finally:
        del on_device
        if model.cuda:
            torch.cuda.empty_cache()


_AUTO_CHOSEN: weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple[int, str], int]] = weakref.WeakKeyDictionary()


def _auto_batch_size(model: _Model, tile: int) -> int:
    """The engine's batch size when the settings leave it open: :data:`CPU_BATCH_SIZE` on CPU
    (capped for large tiles); on a GPU the largest candidate that fits in
    :data:`AUTO_BATCH_MEMORY_FRACTION` of the free memory, found once per model, tile size
    and device in this process (trial forwards at growing sizes, backing off on OOM)."""
    if not model.cuda:
        return batch_size_for(tile, CPU_BATCH_SIZE)
    import torch

    key = (tile, str(model.device))
    known = _AUTO_CHOSEN.setdefault(model.module, {})
    if key not in known:
        free_bytes, _ = torch.cuda.mem_get_info(model.device)
        budget = int(free_bytes * AUTO_BATCH_MEMORY_FRACTION)
        known[key] = choose_batch_size(batch_size_candidates(tile), lambda n: _trial_fits(model, tile, n, budget))
        _log.info("batch size %d chosen for %d px tiles on %s (%.1f GiB free)", known[key], tile, model.device,
                  free_bytes / 2**30)
    return known[key]


def classify_stream(
    classifier: PatchClassifier,
    read_tile: Callable[[int], np.ndarray],
    indices: Sequence[int],
    settings: EngineSettings,
    on_batch: Callable[[int], None] | None = None,
    on_probabilities: Callable[[int, np.ndarray], None] | None = None,
    segment_ends: Sequence[int] = (),
    stats: EngineStats | None = None,
) -> np.ndarray:
    """Probabilities (len(indices), classes) float32 for the tiles ``read_tile(i)``.

    Output order follows ``indices``; results do not depend on thread timing.
    After each batch, ``on_probabilities(start, probabilities)`` receives the batch's rows
    of the output (``start`` is their position in it), then ``on_batch(n)`` the number of
    tiles it held. No batch spans a position in ``segment_ends``: a segment's batches (and
    so its probabilities, bit for bit) do not depend on what is classified around it.
    On CUDA, copies and compute of consecutive batches overlap (:class:`_CudaPipeline`).
    ``stats``, when given, receives timings.
    """
    started = time.perf_counter()
    tile = classifier.preprocessing.tile_size_px
    # Before anything is allocated: refuses tiles too large for any batch.
    batch_size = batch_size_for(tile, settings.batch_size or CPU_BATCH_SIZE)
    model = _Model(classifier, resolve_device(settings.device), settings.cpu_threads)
    if settings.batch_size is None:
        batch_size = _auto_batch_size(model, tile)
    out = np.empty((len(indices), len(classifier.class_names)), dtype=np.float32)
    if not len(indices):
        return out
    bounds = [0, *sorted({e for e in segment_ends if 0 < e < len(indices)}), len(indices)]
    batches = [
        list(indices[i : min(i + batch_size, stop)])
        for start, stop in itertools.pairwise(bounds)
        for i in range(start, stop, batch_size)
    ]

    def read_batch(batch: list[int], pool: ThreadPoolExecutor) -> list[Future[np.ndarray]]:
        return [pool.submit(read_tile, i) for i in batch]

    cuda = _CudaPipeline(model, batch_size, tile) if model.cuda else None
    waited = 0.0

    def finish(start: int, probabilities: np.ndarray) -> None:
        out[start : start + len(probabilities)] = probabilities
        if on_probabilities is not None:
            on_probabilities(start, out[start : start + len(probabilities)])
        if on_batch is not None:
            on_batch(len(probabilities))

    with ThreadPoolExecutor(max_workers=settings.readers, thread_name_prefix="wsiflow-reader") as pool:
        pending: deque[list[Future[np.ndarray]]] = deque()
        next_batch = 0
        done = 0
        in_flight: tuple[int, tuple[torch.Tensor, torch.cuda.Event, torch.cuda.Event, torch.cuda.Event]] | None = None
        # Read ahead by tiles, not batches: batches end at chunk ends, and a run of small ones
        # (a chunk's last few tiles, 1-tile chunks) must not leave the readers idle.
        ahead_limit = (settings.prefetch_batches + 1) * batch_size
        ahead = 0
        try:
            for batch in batches:
                while next_batch < len(batches) and (
                    not pending or ahead + len(batches[next_batch]) <= ahead_limit
                ):
                    pending.append(read_batch(batches[next_batch], pool))
                    ahead += len(batches[next_batch])
                    next_batch += 1
                futures = pending.popleft()
                ahead -= len(futures)
                tiles = (cuda.host_buffer(len(batch)) if cuda is not None
                         else np.empty((len(batch), tile, tile, 3), dtype=np.uint8))
                wait_start = time.perf_counter()
                for k, future in enumerate(futures):
                    tiles[k] = future.result()
                waited += time.perf_counter() - wait_start
                if cuda is None:
                    finish(done, model(tiles))
                else:
                    # Queue this batch, then collect the previous one while this one computes.
                    handle = cuda.submit(len(batch))
                    if in_flight is not None:
                        finish(in_flight[0], cuda.collect(in_flight[1]))
                    in_flight = (done, handle)
                done += len(batch)
            if cuda is not None and in_flight is not None:
                finish(in_flight[0], cuda.collect(in_flight[1]))
        finally:
            for futures in pending:
                for future in futures:
                    future.cancel()
    if stats is not None:
        stats.tiles, stats.wall_s, stats.wait_for_readers_s = len(indices), time.perf_counter() - started, waited
        stats.gpu_busy_s = cuda.busy_s if cuda is not None else None
        stats.batch_size, stats.readers, stats.cpu_threads = batch_size, settings.readers, settings.cpu_threads
    return out



def classify_tiles(
    classifier: PatchClassifier,
    tiles: np.ndarray | Sequence[np.ndarray],
    *,
    batch_size: int = 64,
    device: Device = "cpu",
) -> np.ndarray:
    """Class probabilities (n, classes) float32 for in-memory RGB uint8 tiles.

    The same engine path as slide analysis (same normalisation, same thread count), so
    ``models predict``/``validate`` score tiles exactly as ``wsiflow run`` does.
    """
    array = np.stack(tiles) if not isinstance(tiles, np.ndarray) else tiles
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
        raise ValueError(f"expected RGB uint8 tiles (n, h, w, 3), got {array.dtype} {array.shape}")
    settings = EngineSettings(batch_size=batch_size, readers=1, device=device)
    return classify_stream(classifier, array.__getitem__, range(len(array)), settings)
