"""Arguments every sub-command shares (config file, overrides, threads) and how results are printed."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from p2n.config import P2NConfig, load_config
from p2n.errors import P2NError


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
