"""``p2n dataset``: ``build`` fits many objects into a NeRF dataset on Ray (``ray_jobs/build_dataset.py``, which
takes exactly the same flags); ``info`` prints a dataset's counts, PSNR distribution and failures and writes a
contact sheet of stored views next to renders of their parameters."""

from __future__ import annotations

import argparse
import importlib
from typing import Any

from p2n.cli.common import add_config_args, add_ray_job_args, config_from_args, print_json
from p2n.errors import P2NError


def add_build_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``p2n dataset build`` and of ``ray_jobs/build_dataset.py`` (one definition for both)."""
    p.add_argument("--out", required=True, metavar="URI",
                   help="where the dataset goes: a folder or an fsspec URI such as s3://bucket/ds")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--num-objects", type=int, metavar="N",
                     help="fit the first N objects of the procedural catalogue (default: dataset.num_objects)")
    src.add_argument("--catalogue", metavar="URI",
                     help="fit every object of a catalogue: a folder (local or s3://) whose sub-folders each hold "
                          "one object's transforms.json (or transforms_train/test.json) and images, or a COLMAP "
                          "model (sparse/0/) beside images/")
    p.add_argument("--workers", type=int, metavar="W", help="fitting actors (default: dataset.workers)")
    p.add_argument("--gpus-per-worker", type=float, metavar="G",
                   help="GPUs reserved per fitting actor (default: dataset.gpus_per_worker, 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue the dataset already at --out: fit only objects it has no row for")
    add_ray_job_args(p, "--out/--catalogue", "per-object lines")
    add_config_args(p)


def build_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``ray_jobs.build_dataset.build`` keyword arguments from parsed build arguments."""
    return {
        "out_uri": args.out, "cfg": config_from_args(args), "num_objects": args.num_objects,
        "workers": args.workers, "resume": args.resume, "catalogue": args.catalogue,
        "gpus_per_worker": args.gpus_per_worker, "storage_options": args.storage_options,
        "address": args.address, "progress": not args.no_progress,
    }


def register(sub) -> None:
    p = sub.add_parser("dataset", help="build a NeRF dataset on Ray, or inspect one",
                       description="Build a dataset of per-object NeRFs (sharded across Ray workers, resumable) or "
                                   "inspect one.")
    dsub = p.add_subparsers(dest="dataset_command", metavar="ACTION")
    dsub.required = True

    b = dsub.add_parser("build", help="fit objects into a dataset (parquet shards + manifest.json) at --out",
                        description="Fit objects in parallel on Ray Data and write one row per object as parquet "
                                    "shards plus manifest.json to --out (a folder or s3:// URI). Starts a local Ray "
                                    "unless --address or RAY_ADDRESS names a cluster. Prints one JSON line.")
    add_build_arguments(b)
    b.set_defaults(func=run_build)

    i = dsub.add_parser("info", help="counts, PSNR distribution, failures and a contact sheet of a dataset",
                        description="Print a dataset's counts, PSNR distribution (min/median/mean/max) and failures "
                                    "as one JSON line, and write a contact sheet: stored held-out views next to "
                                    "renders of the stored parameters.")
    i.add_argument("uri", help="the dataset: a folder or an fsspec URI")
    i.add_argument("--sheet", default="./dataset_sheet.png", metavar="PATH", help="contact sheet PNG to write")
    i.add_argument("--sheet-objects", type=int, default=4, metavar="K", help="objects on the contact sheet")
    i.add_argument("--sheet-views", type=int, default=4, metavar="V", help="views per object on the sheet")
    i.add_argument("--storage-options", metavar="JSON", help="fsspec options as JSON (see `build`)")
    i.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    i.set_defaults(func=run_info)


def run_build(args: argparse.Namespace) -> int:
    try:  # ray_jobs is a top-level package beside p2n (installed with it); imported only here: p2n never needs Ray
        job = importlib.import_module("ray_jobs.build_dataset")
    except ModuleNotFoundError as e:
        if e.name not in ("ray_jobs", "ray"):
            raise
        raise P2NError(f"`p2n dataset build` needs {'Ray' if e.name == 'ray' else 'the ray_jobs package'}: install "
                       f"the repo with `pip install -e '.[ray]'` (or run python ray_jobs/build_dataset.py)") from None
    print_json(job.build(**build_kwargs(args)))
    return 0


def run_info(args: argparse.Namespace) -> int:
    from p2n.data.info import dataset_info

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print_json(dataset_info(args.uri, args.sheet, args.storage_options, args.sheet_objects, args.sheet_views))
    return 0
