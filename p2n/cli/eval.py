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
                                   "Writes report.json, report.png and report.md.")
    p.add_argument("--ckpt", required=True, help="generator checkpoint (the --out of `p2n train align`)")
    p.add_argument("--data", required=True, help="dataset URI (the --out of `p2n dataset build`)")
    p.add_argument("--split", choices=["train", "heldout"], default=None, help="only this split (default: both)")
    p.add_argument("--max-objects", type=int, default=None, help="at most this many objects per split")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--storage-options", default=None, help="fsspec storage options as JSON (for s3://)")
    p.add_argument("--device", default="auto")
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
    report = evaluate_generator(gen, ds, args.split, args.max_objects)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = report.summary()
    (out / "report.json").write_text(json.dumps({"summary": summary, "rows": report.rows}, indent=1))
    if report.examples:
        image_grid([[gt, g] for _, gt, g in report.examples],
                   labels=[p[:40] for p, _, _ in report.examples], scale=2).save(out / "report.png")
    lines = ["# p2n evaluation", "", f"checkpoint `{args.ckpt}`, dataset `{args.data}`", "",
             "| group | method | PSNR (dB) | SSIM | n |", "|---|---|---|---|---|"]
    for g, methods in summary.items():
        for m, v in methods.items():
            lines.append(f"| {g} | {m} | {v['psnr']:.2f} | {v['ssim']:.3f} | {v['n']} |")
    lines += ["", "LPIPS and CLIP score need real model weights (not shipped); PSNR/SSIM are on the dataset's "
              "held-out views over the render background.", "", "![examples: truth | generated](report.png)"]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print_json({"out": str(out), "summary": summary})
    return 0
