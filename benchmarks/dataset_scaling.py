"""How dataset building scales with fitting workers: objects/second with 1 and 2 workers on the same objects.

    python benchmarks/dataset_scaling.py                      # 32 objects, 100-step fits, 1 vs 2 workers
    python benchmarks/dataset_scaling.py --num-objects 16 --set fit.steps=400

One local Ray (``--num-cpus``, default every core) is started once and reused, so ``ray.init`` is not timed. Each
run builds the same objects into a fresh folder with ``ray_jobs.build_dataset.build``; every actor gets one torch
thread. Two rates are reported per worker count:

* ``objects_per_second_W``: objects / fitting span (first object started -> last object written), the rate of
  the fitting phase itself;
* ``objects_per_second_end_to_end_W``: objects / pipeline wall-clock, which adds actor start-up (importing
  torch and p2n in each actor, a few seconds) and Ray Data scheduling.

``fit.target_psnr`` is disabled by default so that every object runs the same number of steps and the two runs do
the same work. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_SET = ["fit.steps=100", "fit.target_psnr=null"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--num-objects", type=int, default=32,
                   help="objects fitted per run (default 32; with 8, the one object a worker is still fitting "
                        "when the other runs dry costs about 5%% of the span)")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: every core)")
    p.add_argument("--set", dest="overrides", action="append", default=None, metavar="SECTION.KEY=VALUE",
                   help=f"config overrides (default: {' '.join(DEFAULT_SET)})")
    p.add_argument("--out", default=None, help="also write the JSON record to this file")
    args = p.parse_args(argv)

    import ray

    from p2n.config import P2NConfig
    from ray_jobs.build_dataset import build

    overrides = DEFAULT_SET if args.overrides is None else args.overrides
    cfg = P2NConfig().override(overrides)
    counts = [int(w) for w in args.workers.split(",")]
    num_cpus = args.num_cpus or os.cpu_count() or 1

    t0 = time.perf_counter()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    init_seconds = time.perf_counter() - t0
    record: dict = {"num_objects": args.num_objects, "overrides": overrides, "num_cpus": num_cpus,
                    "ray_init_seconds": round(init_seconds, 2), "torch_threads_per_actor": 1}
    try:
        with tempfile.TemporaryDirectory(prefix="p2n-bench-") as tmp:
            for w in counts:
                print(f"dataset_scaling: {args.num_objects} objects on {w} worker(s)...", file=sys.stderr, flush=True)
                s = build(f"{tmp}/w{w}", cfg, num_objects=args.num_objects, workers=w, progress=False)
                if s["fitted_ok"] != args.num_objects:
                    raise SystemExit(f"only {s['fitted_ok']} of {args.num_objects} objects fitted: {s['failures']}")
                record[f"objects_per_second_{w}"] = round(args.num_objects / s["fit_span_seconds"], 4)
                record[f"objects_per_second_end_to_end_{w}"] = round(args.num_objects / s["pipeline_seconds"], 4)
                record[f"fit_span_seconds_{w}"] = s["fit_span_seconds"]
                record[f"pipeline_seconds_{w}"] = s["pipeline_seconds"]
                record[f"psnr_test_median_{w}"] = s["psnr_test"]["median"]
                record[f"worker_cpus_{w}"] = s["worker_cpus"]
                # Share of W cores the actors actually got: well below 1 means other processes took the CPUs.
                record[f"actor_cpu_utilisation_{w}"] = round(s["actor_cpu_seconds"] / (s["fit_span_seconds"] * w), 3)
    finally:
        ray.shutdown()
    if len(counts) >= 2:
        a, b = counts[0], counts[1]
        record["speedup"] = round(record[f"objects_per_second_{b}"] / record[f"objects_per_second_{a}"], 3)
        record["speedup_end_to_end"] = round(
            record[f"objects_per_second_end_to_end_{b}"] / record[f"objects_per_second_end_to_end_{a}"], 3)
    try:
        record["load_average_1min"] = round(os.getloadavg()[0], 2)  # other work on the machine skews the figures
    except OSError:
        pass
    line = json.dumps(record)
    print(line, flush=True)
    if args.out:
        Path(args.out).write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
