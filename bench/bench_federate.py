"""Benchmark a three-site federation on loopback (real processes, TLS, site keys checked every
round): bytes sent per site per round, round time, and the global model's balanced accuracy on
the pooled held-out set after each round. Uses the test data of ``tests/_federate_data.py``
(needs ../shared/data). ``--secure-aggregation`` sends masked uint64 updates instead.

    .venv/bin/python bench/bench_federate.py --rounds 3 --out /tmp/bench_federate.json
    .venv/bin/python bench/bench_federate.py --rounds 3 --secure-aggregation
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models import classification_metrics, load_parameter_arrays  # noqa: E402
from pipeline import classify_tiles  # noqa: E402
from tests import test_federate as tf  # noqa: E402
from tests._federate_data import held_out_set  # noqa: E402
from tests.conftest import shared_file  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--strategy", choices=("fedavg", "fedprox"), default="fedavg")
    parser.add_argument("--secure-aggregation", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    tf.ROUNDS = args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        sites, homes, tls = tf._setup(root)
        keys, listed = tf._site_keys(root, sites)
        port = tf._free_port()
        extra = ["--min-sites", "3", "--strategy", args.strategy, "--keep-round-models", str(root / "rounds"),
                 "--site-keys", str(listed)]
        if args.strategy == "fedprox":
            extra += ["--proximal-mu", "0.001"]
        if args.secure_aggregation:
            extra += ["--secure-aggregation"]
        start = time.perf_counter()
        server = tf._serve(homes, tls, port, *extra)
        time.sleep(1)
        joins = [tf._join(s, homes[s.name], tls[0], port, "--site-key", str(keys[s.name])) for s in sites]
        for proc in joins:
            tf._finish(proc, timeout=1800)
        report = json.loads(tf._finish(server, timeout=1800))
        wall_s = time.perf_counter() - start
        base = tf._registry(homes["coordinator"]).load("fedbase@1")
        held_x, held_y = held_out_set([shared_file("images/he-500x300.jpg"),
                                       shared_file("images/he-tile-240px.png")])
        # Everything each site sent per round (its own record: updates, challenge answers, seeds).
        sent: dict[int, int] = {}
        for site in sites:
            (record,) = (homes[site.name] / "federation").iterdir()
            per_round: dict[int, int] = {}
            for line in (record / "outgoing.jsonl").read_text().splitlines():
                entry = json.loads(line)
                if entry["kind"] in ("fit", "properties"):
                    per_round[entry["round"]] = per_round.get(entry["round"], 0) + entry["bytes"]
            for round_, total in per_round.items():
                sent[round_] = max(sent.get(round_, 0), total)
        accuracies = []
        for i in range(1, report["rounds_completed"] + 1):
            with np.load(root / "rounds" / f"round-{i}.npz") as saved:
                arrays = [saved[f"arr_{k}"] for k in range(len(saved.files))]
            load_parameter_arrays(base.module, arrays)
            probabilities = classify_tiles(base, held_x, batch_size=64)
            accuracies.append(float(classification_metrics(held_y, probabilities, base.class_names)
                                    ["balanced_accuracy"]))
    rows = []
    for r, acc in zip(report["rounds"], accuracies, strict=False):
        rows.append({"round": r["round"], "sites": r["sites"], "bytes_per_site": r["bytes_per_site"],
                     "site_message_bytes": sent.get(r["round"], 0), "round_time_s": r["round_time_s"], "loss": r["loss"], "balanced_accuracy": round(acc, 3)})
    result = {"strategy": args.strategy, "secure_aggregation": args.secure_aggregation, "rounds": rows,
              "wall_s": round(wall_s, 1)}
    print(json.dumps(result, indent=2))
    print("| round | sites | update bytes per site | all bytes a site sent | round time (s) | training loss | "
          "held-out balanced accuracy |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        loss = "-" if row["loss"] is None else f"{row['loss']:.3f}"
        print(f"| {row['round']} | {row['sites']} | {max(row['bytes_per_site']):,} | {row['site_message_bytes']:,} | "
              f"{row['round_time_s']:.1f} | {loss} | {row['balanced_accuracy']:.3f} |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
