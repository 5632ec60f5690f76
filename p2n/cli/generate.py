"""``p2n generate``: prompts or an image → NeRF params, views, turntable, mesh — one batched forward pass."""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from p2n.cli.common import add_config_args, config_from_args, print_json


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate NeRFs from prompts or an image in one forward pass",
                       description="Generate NeRFs from text prompts or an image with a trained checkpoint (the --out "
                                   "of `p2n train align`). Writes, per prompt, params.safetensors, views.png, "
                                   "turntable.gif (+ .mp4 when ffmpeg is available), mesh.ply and mesh.glb, and "
                                   "prints one JSON line with generate_ms (the forward pass) and render_ms.")
    p.add_argument("--ckpt", required=True, help="generator checkpoint folder or align.safetensors (local or s3://)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a text prompt (repeatable: one batch)")
    src.add_argument("--prompts-file", help="a text file with one prompt per line")
    src.add_argument("--image", action="append", help="a PNG/JPEG image prompt (repeatable)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--no-mesh", action="store_true", help="skip mesh extraction")
    p.add_argument("--no-video", action="store_true", help="skip the turntable (GIF/MP4)")
    p.add_argument("--frames", type=int, default=24, help="turntable frames")
    p.add_argument("--size", type=int, default=None, help="render size in pixels (default: scene.image_size)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto")
    add_config_args(p)
    p.set_defaults(func=run)


def slug(text: str, i: int) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:48]
    return f"{i:02d}-{s or 'prompt'}"


def _true_views(prompt: str, gen, cameras):
    """``(object id, ground-truth views [N, H, W, 3])`` when ``prompt`` names a procedural object ("a red cube",
    "a blue ball on a green box", or an id), rendered exactly at ``cameras``; None for any other prompt."""
    from p2n.errors import P2NError
    from p2n.nerf.render import composite
    from p2n.scenes import resolve_scene
    from p2n.scenes.render import render_views

    try:
        spec = resolve_scene(prompt, gen.cfg.scene)
    except (P2NError, ValueError):
        return None
    return spec.object_id, composite(render_views(spec, cameras, supersample=2).images, gen.cfg.render.background)


def run(args: argparse.Namespace) -> int:
    from p2n.errors import P2NError
    from p2n.export import save_mesh
    from p2n.generate import Generator, decode_image
    from p2n.nerf.params import save_params
    from p2n.nerf.render import psnr
    from p2n.viz import image_grid, save_animation

    if not args.no_video and args.frames < 1:
        raise P2NError(f"--frames {args.frames}: need at least 1 turntable frame (or --no-video)")
    if args.size is not None and args.size < 1:
        raise P2NError(f"--size {args.size}: the render size must be a positive number of pixels")
    cfg = config_from_args(args)
    if args.prompts_file:
        from p2n.generate_batch import read_prompts

        prompts = read_prompts(args.prompts_file)  # one prompts-file format for generate and generate-batch
    else:
        prompts = args.prompt
    images = None
    if args.image:
        images = []
        for path in args.image:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise P2NError(f"--image {path}: {e.strerror}") from None
            images.append(decode_image(data, path))
    gen = Generator.load(args.ckpt, cfg, args.device)
    if images is not None:
        result = gen.from_images(images)
        names = [slug(Path(p).stem, i) for i, p in enumerate(args.image)]
        labels = args.image
    else:
        result = gen.from_prompts(prompts)
        names = [slug(p, i) for i, p in enumerate(prompts)]
        labels = prompts
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    items = []
    for name, label, params in zip(names, labels, result.params):
        d = out / name
        d.mkdir(exist_ok=True)
        save_params(d / "params.safetensors", params, gen.cfg.field, {"prompt": label, "checkpoint": args.ckpt})
        ring = gen.ring(8, args.size)
        views = gen.render(params, ring)
        item: dict = {"prompt": label, "dir": str(d)}
        truth = _true_views(label, gen, ring) if images is None else None
        if truth is not None:
            # a caption of a procedural object: score the generated NeRF against that object, views.png gets both
            object_id, gt = truth
            item.update(truth=object_id, psnr_vs_truth=round(float(psnr(views, gt).mean()), 2))
            image_grid([list(gt), list(views)], scale=2).save(d / "views.png")
        else:
            image_grid([list(views)], scale=2).save(d / "views.png")
        files = ["params.safetensors", "views.png"]
        if not args.no_video:
            frames = gen.render(params, gen.ring(args.frames, args.size))
            save_animation(frames, d / "turntable.gif")
            files.append("turntable.gif")
            try:
                save_animation(frames, d / "turntable.mp4")
                files.append("turntable.mp4")
            except Exception:  # no ffmpeg backend: the GIF is enough
                pass
        if not args.no_mesh:
            try:
                save_mesh(params, gen.cfg, d / "mesh")
                files += ["mesh.ply", "mesh.glb"]
            except P2NError as e:
                files.append(f"(no mesh: {e})")
        items.append({**item, "files": files})
    render_ms = (time.perf_counter() - t) * 1000
    (out / "generate.json").write_text(json.dumps({"items": items, "generate_ms": result.generate_ms,
                                                   "render_ms": render_ms}, indent=1))
    print_json({"generate_ms": round(result.generate_ms, 2), "render_ms": round(render_ms, 1),
                "count": len(items), "out": str(out), "items": items})
    return 0
