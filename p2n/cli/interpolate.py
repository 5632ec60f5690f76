"""``p2n interpolate``: a walk through the latent space between two prompts, as an animation."""

from __future__ import annotations

import argparse
from pathlib import Path

from p2n.cli.common import add_config_args, config_from_args, print_json


def register(sub) -> None:
    p = sub.add_parser("interpolate", help="animate the latent path between two prompts",
                       description="Encode two prompts, walk the VAE latent between them and render one frame per "
                                   "step (a slow orbit), written as a GIF (or MP4 by extension) plus a PNG strip.")
    p.add_argument("--ckpt", required=True, help="generator checkpoint (the --out of `p2n train align`)")
    p.add_argument("--from", dest="src", required=True, help="start prompt")
    p.add_argument("--to", dest="dst", required=True, help="end prompt")
    p.add_argument("--steps", type=int, default=16, help="frames along the path (>= 2)")
    p.add_argument("--out", required=True, help="output animation, e.g. interp.gif")
    p.add_argument("--size", type=int, default=None, help="frame size in pixels")
    p.add_argument("--device", default="auto")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from p2n.errors import P2NError
    from p2n.generate import Generator
    from p2n.latent import interpolate
    from p2n.viz import image_grid, save_animation

    if args.steps < 2:
        raise P2NError(f"--steps {args.steps}: need at least 2 frames")
    if args.size is not None and args.size < 1:
        raise P2NError(f"--size {args.size}: the frame size must be a positive number of pixels")
    if Path(args.out).suffix not in (".gif", ".mp4"):
        raise P2NError(f"--out {args.out}: name the animation .gif or .mp4 (the format follows the extension)")
    cfg = config_from_args(args)
    gen = Generator.load(args.ckpt, cfg, args.device)
    z = gen.latents_from_prompts([args.src, args.dst])
    ts = torch.linspace(0, 1, args.steps)
    params = gen.decode(interpolate(z[0], z[1], ts))
    cams = gen.ring(args.steps, args.size)
    frames = torch.cat([gen.render(p, cams[i]) for i, p in enumerate(params)])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_animation(frames, out)
    strip = out.with_suffix(".png")
    image_grid([list(frames)], scale=2).save(strip)
    print_json({"out": str(out), "strip": str(strip), "steps": args.steps, "from": args.src, "to": args.dst})
    return 0
