"""``p2n fit``: fit one object's NeRF from the shared initialization and write params, pictures and metrics."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from p2n.cli.common import add_config_args, config_from_args, print_json


def register(sub) -> None:
    p = sub.add_parser("fit", help="fit one NeRF (procedural scene, transforms.json or COLMAP folder)",
                       description="Fit one object's NeRF from the shared initialization. Writes params.safetensors, "
                                   "views.png (ground truth vs render), turntable.gif and metrics.json to --out, and "
                                   "prints one JSON line (psnr_test, seconds, steps, num_params).")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scene", help='a caption ("a red cube", "a blue ball on a green box") or a procedural id')
    src.add_argument("--data", help="a folder with transforms.json (or transforms_train/test.json) and its images, "
                                    "or with a COLMAP model (sparse/0/) beside images/")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--steps", type=int, help="maximum optimisation steps (default: fit.steps)")
    p.add_argument("--no-normalize", action="store_true", help="use a capture's camera poses as they are")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from p2n.export import save_turntable
    from p2n.nerf.fit import fit
    from p2n.nerf.field import NeRFField
    from p2n.nerf.params import save_params
    from p2n.nerf.render import composite, render_image
    from p2n.scenes.source import from_folder, from_scene
    from p2n.viz import image_grid

    cfg = config_from_args(args)
    if args.steps is not None:
        cfg = cfg.override([f"fit.steps={args.steps}"])
    obj = from_scene(args.scene, cfg.scene) if args.scene else from_folder(args.data, cfg.scene, not args.no_normalize)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = fit(obj.train, cfg, obj.test, progress=not args.no_progress)
    meta = {"object_id": obj.object_id, "captions": list(obj.captions), "psnr_test": res.psnr_test}
    save_params(out / "params.safetensors", res.params, cfg.field, meta)
    nerf = NeRFField(cfg.field)
    rgb, _ = render_image(nerf, res.params, obj.test.cameras, cfg.render)
    gt = composite(obj.test.images, cfg.render.background)
    k = min(8, len(obj.test))
    image_grid([list(gt[:k]), list(rgb[:k])], labels=["truth", "nerf"], scale=2).save(out / "views.png")
    save_turntable(res.params, cfg, out / "turntable.gif")
    cfg.to_yaml(out / "config.yaml")
    record = {
        "object_id": obj.object_id,
        "psnr_test": round(res.psnr_test, 3),
        "psnr_train": round(res.psnr_train, 3),
        "seconds": round(res.seconds, 3),
        "steps": res.steps,
        "num_params": nerf.num_params,
        "out": str(out),
    }
    (out / "metrics.json").write_text(json.dumps({**record, "psnr_test_views": res.psnr_test_views,
                                                  "history": res.history}, indent=1))
    print_json(record)
    return 0
