"""Benchmark: one generation (a forward pass) vs a from-scratch fit to the same PSNR, and batch throughput.

For each object (procedural, training split by default: the generator should reproduce what it learned), time the
batch-1 forward pass, measure the generated NeRF's PSNR on the object's held-out views, then fit from the shared
init with the multi-view loop until it reaches that PSNR and time it. Prints JSON: ``generate_ms``,
``scratch_fit_ms_to_match``, ``speedup`` (averages over objects), ``per_object``, and ``prompts_per_second`` at
batch 1, 8 and 32 with ``batch32_over_batch1`` (the same 32 catalogue captions pushed through in batches of each
size), and what bounds that ratio on this machine: the batch-32 pass's matrix-product FLOPs over the measured
fp32 matmul rate (``batch32_matmul_floor_ms``) and batch-1 time over that floor (``batch32_over_batch1_ceiling``).

    python benchmarks/generate_vs_fit.py --ckpt outputs/demo/train/align [--num-objects 4] [--set ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from p2n.config import load_config  # noqa: E402
from p2n.generate import Generator, trained_on_pairs  # noqa: E402
from p2n.nerf.fit import evaluate  # noqa: E402
from p2n.refine.loop import refine  # noqa: E402
from p2n.refine.target import from_scene  # noqa: E402
from p2n.scenes import catalogue  # noqa: E402


def throughput(gen: Generator, workload: list[str], batch: int, repeats: int = 3) -> float:
    """Prompts/second over the same ``workload`` cut into batches of ``batch``: every batch size encodes the same
    prompts, so short and long captions weigh the same at batch 1 as at batch 32."""
    chunks = [workload[i:i + batch] for i in range(0, len(workload), batch)]
    gen.from_prompts(chunks[0])  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        for chunk in chunks:
            gen.from_prompts(chunk)
    return len(workload) * repeats / (time.perf_counter() - t)


def matmul_floor(gen: Generator, workload: list[str]) -> dict[str, float]:
    """Matrix-product FLOPs of one batch-32 forward pass (torch's FLOP counter: linear, bmm, attention) and the
    time they take at least at the matmul rate this machine reaches on a BERT-sized product (fp32)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        gen.from_prompts(workload)
    flops = counter.get_total_flops()
    a, b = torch.randn(256, 384), torch.randn(384, 1536)
    for _ in range(20):
        a @ b
    n, t = 200, time.perf_counter()
    for _ in range(n):
        a @ b
    rate = 2 * 256 * 384 * 1536 * n / (time.perf_counter() - t)
    return {"batch32_matmul_gflop": round(flops / 1e9, 3), "machine_matmul_gflops": round(rate / 1e9, 1),
            "batch32_matmul_floor_ms": round(flops / rate * 1000, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True, help="generator checkpoint (the --out of `p2n train align`)")
    ap.add_argument("--num-objects", type=int, default=4)
    ap.add_argument("--split", default="train", choices=["train", "heldout"])
    ap.add_argument("--max-fit-steps", type=int, default=600)
    ap.add_argument("--config", default=None)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    cfg = load_config(args.config, args.overrides)
    gen = Generator.load(args.ckpt, cfg)
    cfg = gen.cfg
    # Objects and captions of the kind the generator was trained on (the demo's: singles only).
    pairs = trained_on_pairs(args.ckpt, cfg.dataset.include_pairs, args.overrides)
    objs = [o for o in catalogue(cfg.scene, cfg.dataset.num_objects, include_pairs=pairs)
            if o.split == args.split][: args.num_objects]
    per = []
    for o in objs:
        prompt = o.captions[0]
        gen.from_prompts([prompt])  # warm-up
        t = time.perf_counter()
        params = gen.from_prompts([prompt]).params[0]
        generate_ms = (time.perf_counter() - t) * 1000
        target = from_scene(o.object_id, cfg)
        gen_psnr = statistics.mean(evaluate(params, target.test, cfg))
        t = time.perf_counter()
        res = refine(_scratch(cfg), "multiview", target, cfg, steps=args.max_fit_steps,
                     stop_at_psnr=gen_psnr)
        fit_ms = (time.perf_counter() - t) * 1000
        reached = bool(res.curve) and max(r.get("psnr_test", float("-inf")) or float("-inf") for r in res.curve) >= gen_psnr
        per.append({"object_id": o.object_id, "prompt": prompt, "generated_psnr": round(gen_psnr, 2),
                    "generate_ms": round(generate_ms, 2), "scratch_fit_ms_to_match": round(fit_ms, 1),
                    "reached": reached, "speedup": round(fit_ms / generate_ms, 1)})
    # 32 different captions (every object's own words, both splits), the same workload at every batch size.
    captions = [c for o in catalogue(cfg.scene, None, include_pairs=pairs) for c in o.captions[:1]][:32]
    workload = (captions * (32 // len(captions) + 1))[:32]
    tp = {b: throughput(gen, workload, b) for b in (1, 8, 32)}
    floor = matmul_floor(gen, workload)
    print(json.dumps({
        "generate_ms": round(statistics.mean(p["generate_ms"] for p in per), 2),
        "scratch_fit_ms_to_match": round(statistics.mean(p["scratch_fit_ms_to_match"] for p in per), 1),
        "speedup": round(statistics.mean(p["speedup"] for p in per), 1),
        "prompts_per_second": {str(b): round(v, 1) for b, v in tp.items()},
        "batch32_over_batch1": round(tp[32] / tp[1], 2),
        # What batching can reach here at best: the batch-32 pass cannot beat its matrix products at this
        # machine's measured matmul rate, so batch-1 time / that floor bounds the ratio from above.
        **floor,
        "batch32_over_batch1_ceiling": round(32 / tp[1] / (floor["batch32_matmul_floor_ms"] / 1000), 2),
        "throughput_workload": {"prompts": len(workload), "distinct": len(set(workload)), "pairs": pairs},
        "per_object": per,
        "threads": torch.get_num_threads(),
    }))


def _scratch(cfg):
    from p2n.nerf.field import init_params

    return init_params(cfg.field, cfg.fit.init_seed)


if __name__ == "__main__":
    main()
