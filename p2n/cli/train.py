"""``p2n train vae|align``: train stage 1 (the VAE over NeRF parameters) or stage 2 (the prompt aligner) with Ray
Train + DeepSpeed, on an embedded local Ray unless ``--address``/``RAY_ADDRESS`` names a cluster.

The same flags drive ``ray_jobs/train_vae.py`` and ``ray_jobs/train_align.py`` (one definition here for all).
"""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from p2n.cli.common import add_config_args, add_ray_job_args, config_from_args, print_json
from p2n.errors import P2NError

_OUT_FILES = {"vae": "vae.safetensors", "align": "align.safetensors + a copy of vae.safetensors"}


def add_train_arguments(p: argparse.ArgumentParser, stage: str) -> None:
    """The flags of ``p2n train <stage>`` and of ``ray_jobs/train_<stage>.py``."""
    p.add_argument("--data", required=True, metavar="URI",
                   help="the NeRF dataset (the --out of `p2n dataset build`): a folder or an fsspec URI")
    p.add_argument("--out", required=True, metavar="URI",
                   help=f"where the run goes (folder or s3:// URI): {_OUT_FILES[stage]}, metrics.jsonl, loss.png, "
                        "and the Ray Train checkpoints under checkpoints/")
    if stage == "align":
        p.add_argument("--vae", required=True, metavar="URI", help="the trained VAE: the --out of `p2n train vae`")
    p.add_argument("--workers", type=int, metavar="W", help="Ray Train workers (default: train.workers)")
    p.add_argument("--gpus-per-worker", type=float, metavar="G",
                   help="GPUs per worker (default: train.gpus_per_worker; >0: bf16 + NCCL, else fp32 + gloo)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run under --out from its latest checkpoint (without it, an earlier run "
                        "there is deleted and training starts over)")
    add_ray_job_args(p, "--data/--out/--vae")
    add_config_args(p)


def train_kwargs(args: argparse.Namespace, stage: str) -> dict[str, Any]:
    """``ray_jobs._train_common.train`` keyword arguments from parsed arguments."""
    return {
        "stage": stage, "data_uri": args.data, "out_uri": args.out, "cfg": config_from_args(args),
        "vae_uri": getattr(args, "vae", None), "workers": args.workers, "gpus_per_worker": args.gpus_per_worker,
        "resume": args.resume, "storage_options": args.storage_options, "address": args.address,
    }


def register(sub) -> None:
    p = sub.add_parser("train", help="train the VAE (stage 1) or the aligner (stage 2) on Ray Train + DeepSpeed",
                       description="Train a stage with Ray Train + DeepSpeed (fp32 + gloo on CPU, bf16 + NCCL on "
                                   "GPU), checkpointing to --out/checkpoints and exporting the final model to --out. "
                                   "Prints one JSON line with the final metrics.")
    tsub = p.add_subparsers(dest="train_stage", metavar="STAGE")
    tsub.required = True
    for stage, text in (("vae", "stage 1: the VAE over flattened NeRF parameters"),
                        ("align", "stage 2: the aligner from text/image embeddings to VAE latents")):
        s = tsub.add_parser(stage, help=text, description=f"Train {text}.")
        add_train_arguments(s, stage)
        s.set_defaults(func=run, stage=stage)


def run(args: argparse.Namespace) -> int:
    try:  # ray_jobs is a top-level package beside p2n (installed with it); imported only here
        job = importlib.import_module("ray_jobs._train_common")
    except ModuleNotFoundError as e:
        if e.name not in ("ray_jobs", "ray", "ray_jobs._train_common"):
            raise
        raise P2NError(f"`p2n train` needs {'Ray' if e.name == 'ray' else 'the ray_jobs package'}: install the repo "
                       "with `pip install -e '.[ray,train]'` (or run python ray_jobs/train_<stage>.py)") from None
    print_json(job.train(**train_kwargs(args, args.stage)))
    return 0
