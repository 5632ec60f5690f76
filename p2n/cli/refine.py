"""``p2n refine``: refine a NeRF from an initialization (generated, mean, scratch) with a guidance, resumably."""

from __future__ import annotations

import argparse
from pathlib import Path

from p2n.cli.common import add_config_args, config_from_args, print_json


def register(sub) -> None:
    p = sub.add_parser(
        "refine", help="refine a NeRF with a guidance (multiview, sds, zero123, clip)",
        description="Refine a NeRF, starting from the generator's output for the prompt (--init generated), the "
                    "generator's mean (--init mean) or the shared scratch initialization (--init scratch), with a "
                    "guidance: multiview (posed views: --data or --scene), sds (a prompt), zero123 (a reference "
                    "image) or clip (either). Writes params.safetensors, curve.json, curve.png, turntable.gif and "
                    "config.yaml to --out, checkpoints to OUT/ckpt every refine.checkpoint_every steps (--resume "
                    "continues from there), and prints one JSON line. Held-out PSNR is tracked whenever the target "
                    "has ground truth (--data, --scene).")
    p.add_argument("--init", default="generated", help="generated | mean | scratch (default: generated)")
    p.add_argument("--guidance", default="multiview", help="a registered guidance: multiview, sds, zero123, clip "
                                                           "(default: multiview)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="a text prompt (sds, clip; generated init)")
    src.add_argument("--image", help="a reference image, PNG or JPEG (zero123, clip; generated init)")
    src.add_argument("--data", help="a transforms.json or COLMAP folder of posed views (multiview; PSNR on its "
                                    "test views)")
    src.add_argument("--scene", help='a procedural caption ("a red cube") or object id; ground truth included')
    p.add_argument("--ckpt", help="trained generator checkpoint URI (needed by --init generated/mean); its field "
                                  "layout is used")
    p.add_argument("--steps", type=int, help="refinement steps (default: refine.steps)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/ckpt when it exists")
    p.add_argument("--model-path", help="the guidance's diffusion model folder, or 'tiny' "
                                        "(same as --set refine.guidance.model_path=...)")
    p.add_argument("--no-normalize", action="store_true", help="--data: use the capture's camera poses as they are")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from p2n.refine import GUIDANCES, RefineError, build_guidance, refine, write_outputs
    from p2n.refine.guidance import GuidanceModelMissing
    from p2n.refine.init import check_init_name, initial_params, load_generator
    from p2n.refine.target import from_folder, from_image, from_prompt, from_scene

    cfg = config_from_args(args)
    # Cheap checks first: a typo should not cost a generator load or a scene render.
    check_init_name(args.init)
    if args.guidance not in GUIDANCES:
        raise RefineError(f"unknown guidance {args.guidance!r}; choose one of: {', '.join(sorted(GUIDANCES))}")
    if args.init != "scratch" and not args.ckpt:
        raise RefineError(f"--init {args.init} needs a trained generator: pass --ckpt URI (e.g. "
                          "outputs/demo/train/align), or use --init scratch")
    if args.model_path is not None:
        cfg = replace(cfg, refine=replace(cfg.refine, guidance=replace(cfg.refine.guidance,
                                                                       model_path=args.model_path)))
    if args.steps is not None:
        cfg = cfg.override([f"refine.steps={args.steps}"])
    generator = None
    if args.ckpt:
        generator = load_generator(args.ckpt, cfg)
        if generator.cfg.field != cfg.field:
            cfg = replace(cfg, field=generator.cfg.field)  # the checkpoint fixes the parameter layout
    try:
        guidance = build_guidance(args.guidance, cfg.refine.guidance)
    except GuidanceModelMissing as e:
        raise GuidanceModelMissing(f"{e} (set it with --model-path DIR or --set refine.guidance.model_path=DIR)") \
            from None

    if args.prompt is not None:
        target = from_prompt(args.prompt)
    elif args.image is not None:
        target = from_image(args.image, cfg)
    elif args.data is not None:
        target = from_folder(args.data, cfg, not args.no_normalize)
    else:
        target = from_scene(args.scene, cfg)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = initial_params(args.init, cfg, target, generator)
    res = refine(start, guidance, target, cfg, ckpt_dir=out / "ckpt", resume=args.resume,
                 progress=not args.no_progress)
    res.meta["init"] = args.init
    write_outputs(res, cfg, out, {"ckpt": args.ckpt} if args.ckpt else None)
    last_loss = next((r["loss"] for r in reversed(res.curve) if "loss" in r), None)
    record = {
        "init": args.init,
        "guidance": args.guidance,
        "target": target.name,
        "steps": res.steps,
        "seconds": round(res.seconds, 3),
        "loss": last_loss,
        "psnr_start": None if res.psnr_start != res.psnr_start else round(res.psnr_start, 3),
        "psnr_test": None if res.psnr_test != res.psnr_test else round(res.psnr_test, 3),
        "resumed_from": res.start_step,
        "out": str(out),
    }
    print_json(record)
    return 0
