"""Long fuzz run of slide opening and reading (the short one is tests/test_fuzz.py).

    .venv/bin/python -m bench.fuzz_slides [--minutes 10] [--seed 0] [--out fuzz-report.json]
                                          [--data ../shared/data] [--timeout 20]

Mutates real slides (byte flips, truncations, TIFF IFD entries and tile offset/size arrays)
and runs each case in a child process (tests/_fuzz.py: open_slide, thumbnail, regions at a
few levels and µm/px). A case violates the contract when an exception that is not a
``WsiflowError`` escapes, the child crashes (e.g. SIGSEGV in a native library) or it hangs
past ``--timeout``. Violations are grouped by signature; the first inputs of each are saved
next to the report (``<report>.cases/``) with the mutation that made them, for reproduction:
``python -c "from tests._fuzz import run_case_in_process; print(run_case_in_process(PATH))"``.
Saved inputs derive from real slides: keep them out of the repository.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests._fuzz import CaseResult, FuzzWorker, random_mutation, tiff_entries  # noqa: E402

__all__ = ["main", "SEED_SLIDES"]

SEED_SLIDES = (
    "slides/CMU-1-Small-Region.svs",
    "slides/small-16px.svs",
    "bad/unreadable-corrupt-tile.svs",
    "synthetic/openslide-python__boxes.tiff",
)
_SAVED_PER_SIGNATURE = 3


def _signature(result: CaseResult) -> str:
    """Group violations: outcome plus exception type and the innermost library frame."""
    if result.outcome != "escaped":
        return f"{result.outcome}: {result.detail}"
    kind = result.detail.split(":", 1)[0]
    frames = [line.strip() for line in result.traceback.splitlines() if line.strip().startswith("File ")]
    return f"escaped: {kind} at {frames[-1] if frames else '?'}"


def _generated_seed(work: Path) -> Path:
    """A small generated pyramidal tiled TIFF (3 levels, JPEG tiles)."""
    import numpy as np

    from tests._synthetic import write_pyramid_tiff

    rng = np.random.default_rng(0)
    image = np.full((600, 800, 3), 243, np.uint8)
    image[100:500, 150:650] = rng.integers(120, 220, (400, 500, 3), dtype=np.uint8)
    return write_pyramid_tiff(work / "generated.tiff", image, 0.5, levels=3, tile_px=128)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("fuzz-report.json"))
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds per case before it counts as a hang")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    cases_dir = args.out.with_name(args.out.name + ".cases")
    cases_dir.mkdir(parents=True, exist_ok=True)
    seeds: list[tuple[str, bytes, str]] = []
    for relative in SEED_SLIDES:
        path = args.data / relative
        if path.exists():
            seeds.append((relative, path.read_bytes(), path.suffix))
    generated = _generated_seed(cases_dir)
    seeds.append(("generated.tiff", generated.read_bytes(), ".tiff"))
    entries = {name: tiff_entries(data) for name, data, _ in seeds}

    outcomes: Counter[str] = Counter()
    per_seed: Counter[str] = Counter()
    violations: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + args.minutes * 60
    cases = 0
    with FuzzWorker(timeout=args.timeout) as worker:
        while time.monotonic() < deadline:
            name, data, suffix = rng.choice(seeds)
            backend = rng.choice(("auto", "auto", "tiffslide", "openslide"))
            mutated, steps = data, []
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                mutated, step = random_mutation(rng, mutated, entries[name])
                steps.append(step)
            result = worker.run(mutated, suffix, backend)
            cases += 1
            outcomes[result.outcome] += 1
            per_seed[name] += 1
            if not result.violates_contract:
                continue
            signature = _signature(result)
            entry = violations.setdefault(signature, {"signature": signature, "count": 0, "examples": []})
            entry["count"] += 1
            if len(entry["examples"]) < _SAVED_PER_SIGNATURE:
                saved = cases_dir / f"case-{len(violations):03d}-{len(entry['examples'])}{suffix}"
                saved.write_bytes(mutated)
                entry["examples"].append({
                    "seed_slide": name, "backend": backend, "mutations": steps, "saved": str(saved),
                    "detail": result.detail, "traceback": result.traceback[-2000:], "seconds": round(result.seconds, 3),
                })
                print(f"[{cases}] {signature} ({name}, {backend}: {'; '.join(steps)})", file=sys.stderr)
        restarts = worker.restarts
    report = {
        "minutes": args.minutes, "seed": args.seed, "cases": cases, "outcomes": dict(outcomes),
        "cases_per_seed": dict(per_seed), "child_restarts": restarts,
        "violations": sorted(violations.values(), key=lambda v: -v["count"]),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("cases", "outcomes", "child_restarts")}))
    print(f"{len(violations)} violation signature(s); report in {args.out}")
    return 1 if violations else 0


if __name__ == "__main__":
    sys.exit(main())
