"""Benchmark: fitting one procedural object with the default config.

Prints one JSON object: psnr_test, seconds, steps, rays_per_second, num_params per object and on average, for the
PyTorch hash grid and (where tiny-cuda-nn and CUDA exist) for tcnn on the same objects.

    python benchmarks/fit.py [--scene "a red cube" ...] [--set fit.steps=400] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from p2n.config import load_config  # noqa: E402
from p2n.nerf.encoding import tcnn_module  # noqa: E402
from p2n.nerf.field import NeRFField  # noqa: E402
from p2n.nerf.fit import fit  # noqa: E402
from p2n.scenes import render_object, resolve_scene  # noqa: E402


def run(scenes: list[str], overrides: list[str], device_impl: str) -> dict:
    cfg = load_config(None, overrides + [f"field.implementation={device_impl}"])
    per = []
    for s in scenes:
        train, test = render_object(resolve_scene(s, cfg.scene), cfg.scene)
        r = fit(train, cfg, test)
        per.append({"scene": s, "psnr_test": round(r.psnr_test, 2), "seconds": round(r.seconds, 2), "steps": r.steps,
                    "rays_per_second": round(r.steps * cfg.fit.rays_per_step / r.seconds)})
    return {
        "implementation": device_impl,
        "psnr_test": round(statistics.mean(p["psnr_test"] for p in per), 2),
        "seconds": round(statistics.mean(p["seconds"] for p in per), 2),
        "steps": round(statistics.mean(p["steps"] for p in per), 1),
        "rays_per_second": round(statistics.mean(p["rays_per_second"] for p in per)),
        "num_params": NeRFField(cfg.field).num_params,
        "objects": per,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scene", action="append", help="scene captions (default: a red cube, a blue sphere, a green torus)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override SECTION.KEY=VALUE")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    scenes = args.scene or ["a red cube", "a blue sphere", "a green torus"]
    out = {"torch": run(scenes, args.overrides, "torch"), "threads": torch.get_num_threads()}
    if tcnn_module() is not None and torch.cuda.is_available():
        out["tcnn"] = run(scenes, args.overrides, "tcnn")
    else:
        out["tcnn"] = None
        out["tcnn_note"] = "tiny-cuda-nn or CUDA not available on this machine"
    print(json.dumps(out))


if __name__ == "__main__":
    main()
