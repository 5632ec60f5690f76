"""Arguments every sub-command shares (config file, overrides, threads) and how results are printed."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from p2n.config import P2NConfig, load_config
from p2n.errors import P2NError


def add_ray_job_args(p: argparse.ArgumentParser, uris: str, progress: str | None = None) -> None:
    """The flags every Ray job command shares: ``--storage-options`` (for the flags named in ``uris``),
    ``--address`` and, when ``progress`` names what is reported, ``--no-progress``."""
    p.add_argument("--storage-options", metavar="JSON",
                   help=f"fsspec options for {uris} as JSON, e.g. "
                        "'{\"client_kwargs\": {\"endpoint_url\": \"http://minio:9000\"}}' (S3 credentials, region and "
                        "endpoint otherwise come from the AWS_* environment variables)")
    p.add_argument("--address", metavar="ADDR",
                   help="Ray cluster to use (default: RAY_ADDRESS, else start a local Ray on this machine)")
    if progress:
        p.add_argument("--no-progress", action="store_true", help=f"no progress bars or {progress}")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE.yaml", help="a p2n config (defaults run on a 2-core CPU)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value, e.g. --set fit.steps=200 (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")


def config_from_args(args: argparse.Namespace) -> P2NConfig:
    try:
        cfg = load_config(args.config, args.overrides)
    except (OSError, ValueError, TypeError) as e:
        raise P2NError(f"bad config: {e}") from None
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)
    return cfg


def print_json(record: dict[str, Any]) -> None:
    """One JSON line on stdout: the machine-readable result of a command."""
    print(json.dumps(record, default=float), flush=True)
    sys.stdout.flush()
