"""Benchmark: refinement steps (and seconds) each initialization needs to reach a target PSNR on held-out objects.

The paper's second claim: a generated NeRF used as the start of a slow optimiser converges 3-5x faster than the
shared scratch initialization. On each of ``--num-objects`` objects the generator never saw — the procedural
catalogue's ``split == "heldout"`` objects under ``scene.seed`` / ``scene.heldout_fraction`` (pass the ``--config``
its dataset was built with), or the heldout split of that dataset itself with ``--dataset`` — with the same seeds
for every initialization:

1. ``scratch`` runs the whole budget (``--steps``); the held-out PSNR it reaches (the mean of its last
   ``--target-window`` evaluations, which evens out the step-to-step noise of a converged run) is the object's
   target;
2. every other initialization (``generated``, ``mean``) runs until its held-out PSNR reaches the target, or the
   budget ends (then it counts as the budget and ``reached`` says so).

Held-out PSNR is measured every ``--eval-every`` steps on the object's test ring, and the step (and optimisation
second) where a curve crosses the target is interpolated linearly between evaluations. Averages are ratios of mean
steps over objects; per-object ratios are reported too. Writes OUT/refine_speedup.json and OUT/refine_speedup.png
(mean held-out PSNR per step of each initialization; a curve that stopped at its target is held there), and prints
the JSON.

    python benchmarks/refine_speedup.py --ckpt outputs/demo/train/align [--num-objects 8] [--steps 300] \
        [--inits generated,mean,scratch] [--out outputs/bench/refine] [--set refine.rays_per_step=1024]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from p2n.config import load_config  # noqa: E402
from p2n.refine import INITS, heldout_targets, initial_params, load_generator, refine  # noqa: E402
from p2n.refine.target import from_folder  # noqa: E402

# Small and fast by default: 32 px views, 4 held-out views, no checkpoints. --set overrides any of them.
# A target scratch does not beat its own start by this much says the budget is too short for that object (scratch
# still in its fog phase): the object is reported but left out of the averages.
MIN_GAIN_DB = 1.0
BENCH_DEFAULTS = ["scene.image_size=32", "scene.num_train_views=24", "scene.num_test_views=4",
                  "refine.rays_per_step=1024", "refine.eval_views=null", "refine.checkpoint_every=0"]


def steps_to_target(curve: list[dict], target: float, key: str = "step") -> float | None:
    """Where the held-out PSNR first reaches ``target`` (``key``: "step" or "seconds"), interpolated linearly
    between the evaluation before and the one that reached it; None if it never does."""
    evals = [r for r in curve if "psnr_test" in r]
    prev = None
    for r in evals:
        if r["psnr_test"] >= target:
            if prev is None or r["psnr_test"] == prev["psnr_test"]:
                return float(r[key])
            f = (target - prev["psnr_test"]) / (r["psnr_test"] - prev["psnr_test"])
            return float(prev[key] + f * (r[key] - prev[key]))
        prev = r
    return None


def held_curve(curve: list[dict], xs: list[int]) -> list[float]:
    """PSNR at each step of ``xs``: the last evaluation at or before it (held after an early stop)."""
    evals = [(r["step"], r["psnr_test"]) for r in curve if "psnr_test" in r]
    out, j = [], 0
    for x in xs:
        while j + 1 < len(evals) and evals[j + 1][0] <= x:
            j += 1
        out.append(evals[j][1])
    return out


def _strict(x):
    """JSON has no infinity: an init that starts above the target (0 steps) has speedup "inf"."""
    if isinstance(x, dict):
        return {k: _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    return "inf" if isinstance(x, float) and math.isinf(x) else x


def _trained_on_pairs(args: argparse.Namespace, default: bool) -> bool:
    """Draw held-out pairs only if the generator was trained with them: ``dataset.include_pairs`` from --set, else
    from the checkpoint's own ``config.json`` (the demo's is singles only), else the config's."""
    from p2n.generate import trained_on_pairs

    return trained_on_pairs(args.ckpt, default, args.overrides) if args.ckpt else default


def _or(x: float | None, default: float) -> float:
    return default if x is None else x


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return math.inf if b == 0 else a / b


def run(args: argparse.Namespace) -> dict:
    inits = [s.strip() for s in args.inits.split(",") if s.strip()]
    bad = [i for i in inits if i not in INITS]
    if bad or "scratch" not in inits:
        raise SystemExit(f"--inits {args.inits!r}: choose from {', '.join(INITS)}, scratch included "
                         "(it sets the target)")
    cfg = load_config(args.config, BENCH_DEFAULTS + args.overrides)
    cfg = cfg.override([f"refine.eval_every={args.eval_every}"])
    generator = None
    include_pairs = _trained_on_pairs(args, cfg.dataset.include_pairs)
    if any(i != "scratch" for i in inits):
        if not args.ckpt:
            raise SystemExit("--ckpt is required for the generated and mean initializations")
        generator = load_generator(args.ckpt, cfg)
        cfg = replace(cfg, field=generator.cfg.field)  # the generator's VAE fixes the parameter layout
    if args.object:
        targets = [from_folder(o, cfg) if Path(o).is_dir() else None for o in args.object]
        ids = [o for o, t in zip(args.object, targets) if t is None]
        targets = [t for t in targets if t is not None] + heldout_targets(cfg, len(ids), object_ids=ids)
    elif args.dataset:
        from p2n.data.reader import open_dataset

        ids = open_dataset(args.dataset).object_ids(split="heldout")
        if len(ids) < args.num_objects:
            raise SystemExit(f"{args.dataset} has {len(ids)} held-out objects, --num-objects is {args.num_objects}")
        targets = heldout_targets(cfg, args.num_objects, object_ids=ids)
    else:
        targets = heldout_targets(cfg, args.num_objects, include_pairs=include_pairs)

    order = ["scratch"] + [i for i in inits if i != "scratch"]
    per_object, skipped = [], []
    t_start = time.perf_counter()
    for k, target in enumerate(targets):
        row = {"object_id": target.name, "split": target.split, "prompt": target.prompt, "inits": {}}
        psnr_target = None
        for init in order:
            start = initial_params(init, cfg, target, generator)
            res = refine(start, args.guidance, target, cfg, steps=args.steps,
                         stop_at_psnr=None if init == "scratch" else psnr_target, progress=args.progress)
            if init == "scratch":
                last = [e["psnr_test"] for e in res.evaluations()][-max(args.target_window, 1):]
                psnr_target = args.target_psnr if args.target_psnr is not None else sum(last) / len(last)
                if psnr_target < res.psnr_start + MIN_GAIN_DB:
                    print(f"[{k + 1}/{len(targets)}] {target.name}: scratch ends at {psnr_target:.2f} dB, not "
                          f"{MIN_GAIN_DB} dB above its start ({res.psnr_start:.2f} dB): --steps {args.steps} is too "
                          "short for this object; left out", file=sys.stderr, flush=True)
                    skipped.append({"object_id": target.name, "scratch_start": round(res.psnr_start, 3),
                                    "target_psnr": round(psnr_target, 3)})
                    break
            s = steps_to_target(res.curve, psnr_target)
            sec = steps_to_target(res.curve, psnr_target, key="seconds")
            row["inits"][init] = {
                "psnr_start": round(res.psnr_start, 3), "psnr_end": round(res.psnr_test, 3),
                "steps_to_target": s, "seconds_to_target": sec, "reached": s is not None,
                "steps_run": res.steps, "seconds_run": round(res.seconds, 3),
                "evals": [(r["step"], round(r["psnr_test"], 3)) for r in res.evaluations()],
            }
            print(f"[{k + 1}/{len(targets)}] {target.name} {init:9s} start {res.psnr_start:6.2f} dB -> "
                  f"{res.psnr_test:6.2f} dB in {res.steps} steps; to target {psnr_target:.2f} dB: "
                  f"{'not reached' if s is None else f'{s:.1f} steps'}", file=sys.stderr, flush=True)
        else:
            row["target_psnr"] = round(psnr_target, 3)
            per_object.append(row)
    if not per_object:
        raise SystemExit(f"scratch did not improve by {MIN_GAIN_DB} dB on any object within --steps {args.steps}; "
                         "give a larger budget")

    def mean_of(init: str, key: str) -> float:
        # Not reached: counted as the whole budget (steps) / the whole run (seconds) -- flattering to that init.
        return statistics.mean(_or(o["inits"][init][key], args.steps if key == "steps_to_target" else
                                   o["inits"][init]["seconds_run"]) for o in per_object)

    steps = {i: round(mean_of(i, "steps_to_target"), 2) for i in order}
    secs = {i: round(mean_of(i, "seconds_to_target"), 3) for i in order}
    reached = {i: f"{sum(o['inits'][i]['reached'] for o in per_object)}/{len(per_object)}" for i in order}
    per_ratio = [_ratio(o["inits"]["scratch"]["steps_to_target"],
                        _or(o["inits"]["generated"]["steps_to_target"], args.steps))
                 for o in per_object if "generated" in o["inits"]]
    finite = [r for r in per_ratio if r is not None and math.isfinite(r) and r > 0]
    result = {
        "num_objects": len(per_object),
        "objects_left_out": skipped,
        "budget_steps": args.steps,
        "eval_every": args.eval_every,
        "target": (f"{args.target_psnr} dB" if args.target_psnr is not None else
                   f"scratch's mean held-out PSNR over its last {args.target_window} evaluations"),
        "guidance": args.guidance,
        "heldout_pairs": include_pairs,  # False: held-out single objects only (a generator trained on singles)
        "target_psnr_mean": round(statistics.mean(o["target_psnr"] for o in per_object), 3),
        "steps_to_target": steps,
        "seconds_to_target": secs,
        "reached": reached,
        "speedup_vs_scratch": _ratio(steps["scratch"], steps.get("generated")),
        "speedup_vs_mean": _ratio(steps.get("mean"), steps.get("generated")),
        "mean_speedup_vs_scratch": _ratio(steps["scratch"], steps.get("mean")),
        "speedup_vs_scratch_seconds": _ratio(secs["scratch"], secs.get("generated")),
        "speedup_vs_mean_seconds": _ratio(secs.get("mean"), secs.get("generated")),
        "speedup_vs_scratch_per_object": per_ratio,
        "speedup_vs_scratch_geomean": (math.exp(statistics.mean(math.log(r) for r in finite)) if finite else None),
        "unreached_counted_as": "the budget (steps) / the whole run (seconds)",
        "wall_seconds": round(time.perf_counter() - t_start, 1),
        "threads": torch.get_num_threads(),
        "ckpt": args.ckpt,
        "overrides": BENCH_DEFAULTS + args.overrides,
        "objects": per_object,
    }
    for k in [k for k in result if k.startswith(("speedup", "mean_speedup")) and isinstance(result[k], float)]:
        result[k] = round(result[k], 3)
    result = _strict(result)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "refine_speedup.json").write_text(json.dumps(result, indent=1, allow_nan=False))
    _plot(per_object, order, args, out / "refine_speedup.png", result)
    return result


def _plot(per_object: list[dict], order: list[str], args, path: Path, result: dict) -> None:
    from p2n.viz import plot_curves

    xs = list(range(0, args.steps + 1, max(args.eval_every, 1)))
    curves = {}
    for init in order:
        ys = [held_curve([{"step": s, "psnr_test": p} for s, p in o["inits"][init]["evals"]], xs) for o in per_object]
        curves[f"{init} ({result['steps_to_target'][init]:.0f} steps)"] = (xs, [statistics.mean(c) for c in zip(*ys)])
    curves["target (scratch at budget)"] = ([0, args.steps], [result["target_psnr_mean"]] * 2)
    plot_curves(curves, path, ylabel="mean held-out PSNR (dB)",
                title=f"{args.guidance} refinement, {len(per_object)} held-out objects")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", help="trained generator checkpoint (needed for generated / mean)")
    ap.add_argument("--num-objects", type=int, default=8)
    ap.add_argument("--steps", type=int, default=200,
                    help="the refinement budget; the PSNR scratch reaches after it is the target")
    ap.add_argument("--target-window", type=int, default=3,
                    help="scratch's last N evaluations averaged into the target")
    ap.add_argument("--target-psnr", type=float, help="a fixed target instead (dB, every object)")
    ap.add_argument("--eval-every", type=int, default=10, help="steps between held-out evaluations")
    ap.add_argument("--inits", default="generated,mean,scratch")
    ap.add_argument("--guidance", default="multiview")
    ap.add_argument("--dataset", help="take held-out object ids from this NeRF dataset (procedural ids)")
    ap.add_argument("--object", action="append", help="an object id or transforms.json folder (repeatable; "
                                                      "replaces the held-out selection)")
    ap.add_argument("--out", default="outputs/bench/refine_speedup")
    ap.add_argument("--config", help="a p2n config YAML")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override SECTION.KEY=VALUE")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(json.dumps({k: v for k, v in result.items() if k != "objects"}, allow_nan=False))


if __name__ == "__main__":
    main()
