"""``p2n generate-batch``: every prompt of a file through a pool of generator actors on Ray Data, into parquet
shards at a folder or s3:// URI (``ray_jobs/generate_batch.py``, which takes exactly the same flags)."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from p2n.cli.common import add_config_args, add_ray_job_args, config_from_args, print_json
from p2n.errors import P2NError


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``p2n generate-batch`` and of ``ray_jobs/generate_batch.py`` (one definition for both)."""
    p.add_argument("--ckpt", required=True, metavar="URI", help="generator checkpoint (the --out of `p2n train align`)")
    p.add_argument("--prompts", required=True, metavar="URI",
                   help="UTF-8 text file (local or s3://), one prompt per line; blank lines are skipped")
    p.add_argument("--out", required=True, metavar="URI",
                   help="where the rows go: a folder or an fsspec URI such as s3://bucket/generations")
    p.add_argument("--workers", type=int, metavar="W", help="generator actors (default: batch.workers)")
    p.add_argument("--gpus-per-worker", type=float, metavar="G", help="GPUs per actor (default: batch.gpus_per_worker)")
    p.add_argument("--batch-size", type=int, metavar="B",
                   help="prompts per forward pass and per shard (default: batch.batch_size)")
    p.add_argument("--views", type=int, metavar="V", help="rendered views per prompt in its PNG; 0: none "
                                                          "(default: batch.views)")
    p.add_argument("--resume", action="store_true", help="continue the output at --out: only prompts without a row")
    add_ray_job_args(p, "--ckpt/--prompts/--out", "per-prompt lines")
    add_config_args(p)


def job_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``ray_jobs.generate_batch.generate_batch`` keyword arguments from parsed arguments."""
    return {"ckpt": args.ckpt, "prompts": args.prompts, "out_uri": args.out, "cfg": config_from_args(args),
            "workers": args.workers, "gpus_per_worker": args.gpus_per_worker, "batch_size": args.batch_size,
            "views": args.views, "resume": args.resume, "storage_options": args.storage_options,
            "address": args.address, "progress": not args.no_progress}


def register(sub) -> None:
    p = sub.add_parser("generate-batch", help="generate a whole prompts file on Ray into parquet shards",
                       description="Generate a NeRF for every line of a prompts file with a pool of generator "
                                   "actors on Ray Data (batched forward passes), writing one parquet row per prompt "
                                   "(params.safetensors bytes, a PNG of views, timings) plus manifest.json to --out. "
                                   "Resumable; a prompt the encoder refuses becomes a failed row. Starts a local Ray "
                                   "unless --address or RAY_ADDRESS names a cluster. Prints one JSON line.")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:  # ray_jobs is a top-level package beside p2n; imported only here: p2n never needs Ray
        job = importlib.import_module("ray_jobs.generate_batch")
    except ModuleNotFoundError as e:
        if e.name not in ("ray_jobs", "ray"):
            raise
        raise P2NError(f"`p2n generate-batch` needs {'Ray' if e.name == 'ray' else 'the ray_jobs package'}: "
                       f"install the repo with `pip install -e '.[ray]'` (or run python ray_jobs/generate_batch.py)"
                       ) from None
    print_json(job.generate_batch(**job_kwargs(args)))
    return 0
