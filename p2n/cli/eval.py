"""``p2n eval``: generation vs ground truth on a dataset, with the mean-latent and nearest-caption baselines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from p2n.cli.common import add_config_args, config_from_args, print_json


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a generator on a dataset (PSNR, SSIM, baselines)",
                       description="For each evaluated object: generate from a caption it was never trained with "
                                   "(held-out paraphrases of training objects; captions of held-out colour x shape "
                                   "objects) and from one of its views; render against its ground-truth views. "
                                   "Baselines: the mean latent, the nearest training object by caption embedding. "
                                   "Metrics: PSNR, SSIM; LPIPS with --lpips-weights; CLIP score with --clip (or "
                                   "when the checkpoint's image encoder is an open_clip CLIP). "
                                   "Writes report.json, report.png and report.md.")
    p.add_argument("--ckpt", required=True, help="generator checkpoint (the --out of `p2n train align`)")
    p.add_argument("--data", required=True, help="dataset URI (the --out of `p2n dataset build`)")
    p.add_argument("--split", choices=["train", "heldout"], default=None, help="only this split (default: both)")
    p.add_argument("--max-objects", type=int, default=None, help="at most this many objects per split")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--storage-options", default=None, help="fsspec storage options as JSON (for s3://)")
    p.add_argument("--device", default="auto")
    p.add_argument("--lpips-weights", metavar="FILE",
                   help="LPIPS (AlexNet) weights: the state_dict of lpips.LPIPS(net='alex') as .pth or .safetensors; "
                        "make it on a machine with internet: python -c \"import lpips, torch; "
                        "torch.save(lpips.LPIPS(net='alex').state_dict(), 'lpips_alex.pth')\"")
    p.add_argument("--clip", metavar="SPEC",
                   help="CLIP for the CLIP score, an encoder spec such as openclip:ViT-B-32:/path/open_clip_model.bin "
                        "(default: the checkpoint's image encoder when it is an openclip one; 'none' to skip)")
    add_config_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from p2n.data import open_dataset
    from p2n.evaluate import evaluate_generator
    from p2n.generate import Generator
    from p2n.viz import image_grid

    cfg = config_from_args(args)
    gen = Generator.load(args.ckpt, cfg, args.device)
    ds = open_dataset(args.data, args.storage_options)
    lpips = None
    if args.lpips_weights:
        from p2n.perceptual import load_lpips

        lpips = load_lpips(args.lpips_weights, gen.vae.device)
    report = evaluate_generator(gen, ds, args.split, args.max_objects, lpips=lpips, clip=_clip(args, gen))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = report.summary()
    (out / "report.json").write_text(json.dumps({"summary": summary, "rows": report.rows}, indent=1))
    if report.examples:
        image_grid([[gt, g] for _, gt, g in report.examples],
                   labels=[p[:40] for p, _, _ in report.examples], scale=2).save(out / "report.png")
    extra = [(k, label) for k, label in (("lpips", "LPIPS"), ("clip_score", "CLIP score"))
             if any(k in v for methods in summary.values() for v in methods.values())]
    lines = ["# p2n evaluation", "", f"checkpoint `{args.ckpt}`, dataset `{args.data}`", "",
             "| group | method | PSNR (dB) | SSIM | " + "".join(f"{label} | " for _, label in extra) + "n |",
             "|---|---|---|---|" + "---|" * len(extra) + "---|"]
    for g, methods in summary.items():
        for m, v in methods.items():
            cells = "".join(f"{v[k]:.3f} | " if k in v else "— | " for k, _ in extra)
            lines.append(f"| {g} | {m} | {v['psnr']:.2f} | {v['ssim']:.3f} | {cells}{v['n']} |")
    missing = [label for k, label in (("lpips", "LPIPS (--lpips-weights FILE)"),
                                       ("clip_score", "CLIP score (--clip openclip:MODEL:/path/weights)"))
               if k not in dict(extra)]
    lines += ["", "PSNR/SSIM are on the dataset's held-out views over the render background; LPIPS is lower-better."]
    if missing:
        lines += [f"Not computed, for want of local model weights: {', '.join(missing)}."]
    lines += ["", "![examples: truth | generated](report.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print_json({"out": str(out), "summary": summary})
    return 0


def _clip(args: argparse.Namespace, gen):
    """The encoder for the CLIP score: --clip, else the checkpoint's own image encoder if it is a real CLIP
    (open_clip weights; the seeded random tiny-clip would give meaningless scores), else none."""
    if args.clip and args.clip.lower() == "none":
        return None
    if args.clip:
        from p2n.align.encoders import build_encoder

        return build_encoder(args.clip, gen.vae.device)
    spec = gen.bundle.cfg.image_encoder or ""
    return gen.bundle.image_encoder if spec.startswith("openclip:") else None
