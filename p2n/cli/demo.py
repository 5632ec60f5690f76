"""``p2n demo``: the whole pipeline, small enough for a 2-core laptop, writing pictures to ``--out``.

Stages (each writes under OUT/<stage>/ and is skipped on a re-run when its result already exists):
  fit       two procedural objects fitted from the shared init (params, views.png, turntable.gif)
Later stages are appended as the platform grows; ``--stages`` picks a subset.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from p2n.cli.common import add_config_args, config_from_args, print_json

DEMO_OBJECTS = ["a red cube", "a blue sphere on a yellow cube"]


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the whole pipeline on a local machine",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="output folder (default: outputs/demo)")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated subset of: {', '.join(STAGES)}")
    add_config_args(p)
    p.set_defaults(func=run)


def stage_fit(out: Path, cfg, summary: dict) -> None:
    from p2n.export import save_turntable
    from p2n.nerf.fit import fit
    from p2n.nerf.params import save_params
    from p2n.scenes.source import from_scene

    results = []
    for i, scene in enumerate(DEMO_OBJECTS):
        d = out / f"object{i}"
        d.mkdir(parents=True, exist_ok=True)
        obj = from_scene(scene, cfg.scene)
        res = fit(obj.train, cfg, obj.test, progress=True)
        save_params(d / "params.safetensors", res.params, cfg.field, {"object_id": obj.object_id})
        save_turntable(res.params, cfg, d / "turntable.gif")
        results.append({"scene": scene, "psnr_test": round(res.psnr_test, 2), "seconds": round(res.seconds, 1),
                        "turntable": str(d / "turntable.gif")})
        print(f"[demo] fitted {scene!r}: {res.psnr_test:.2f} dB in {res.seconds:.1f} s", flush=True)
    summary["fit"] = results


STAGES = {"fit": stage_fit}


def run(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    chosen = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        from p2n.errors import P2NError

        raise P2NError(f"unknown demo stage(s) {unknown}; choose from {list(STAGES)}")
    summary: dict = {"out": str(out)}
    t0 = time.perf_counter()
    for name in chosen:
        ts = time.perf_counter()
        print(f"[demo] stage {name} ...", flush=True)
        STAGES[name](out / name, cfg, summary)
        summary.setdefault("stage_seconds", {})[name] = round(time.perf_counter() - ts, 1)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print_json(summary)
    return 0
