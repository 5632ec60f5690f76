"""``p2n serve``: the HTTP service (``serve/app.py``) on an embedded local Ray, until Ctrl-C.

The Ray Serve adapter is loaded lazily with importlib, like ``p2n dataset build`` loads ``ray_jobs``: p2n itself
never imports Ray. The same application runs on a cluster with ``serve deploy serve/config.yaml`` or on Kubernetes
from ``cluster/kuberay/rayservice.yaml``.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from types import ModuleType

from p2n.cli.common import add_config_args
from p2n.errors import P2NError


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve generation, rendering and refinement over HTTP (Ray Serve)",
                       description="Start Ray Serve on this machine with a generator checkpoint and block until "
                                   "Ctrl-C. Prints the URL: the web page is at /, the API under /v1, its docs at "
                                   "/docs. Replicas, limits and the artefact store come from the config's serve: "
                                   "section (--set serve.generator.max_replicas=4). When the P2N_API_KEY environment "
                                   "variable is set, /v1 requests must send it (Authorization: Bearer or X-API-Key).")
    p.add_argument("--ckpt", required=True, metavar="URI",
                   help="generator checkpoint: the --out folder of `p2n train align` (local or s3://)")
    p.add_argument("--host", default=None, help="interface to listen on (default: serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, default=None, help="HTTP port (default: serve.port, 8000)")
    p.add_argument("--store", default=None, metavar="URI",
                   help="artefact store for jobs and downloads, a folder or fsspec URI (default: serve.store)")
    p.add_argument("--storage-options", default=None, metavar="JSON", help="fsspec options for --ckpt/--store")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="an existing Ray cluster (default: start a local Ray inside this process)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--dashboard", action="store_true", help="also start the Ray dashboard")
    add_config_args(p)
    p.set_defaults(func=run)


def load_serve_app() -> ModuleType:
    """``serve.app``: installed beside p2n, or (a source checkout) from the repository root."""
    try:
        return importlib.import_module("serve.app")
    except ModuleNotFoundError as e:
        if e.name not in ("serve", "serve.app"):
            if e.name in ("ray", "fastapi"):
                raise P2NError(f"`p2n serve` needs {e.name}: install the repo with `pip install -e '.[ray,serve]'`"
                               ) from None
            raise
    root = Path(__file__).resolve().parents[2]
    if not (root / "serve" / "app.py").is_file():
        raise P2NError("`p2n serve` needs the serve package (serve/app.py beside p2n/); run it from a source "
                       "checkout or install the repo with `pip install -e '.[ray,serve]'`")
    sys.path.insert(0, str(root))
    # Ray's workers are started by its raylet and inherit this environment: they must find serve.app too.
    os.environ["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    return importlib.import_module("serve.app")


def run(args: argparse.Namespace) -> int:
    from p2n.data.storage import parse_storage_options

    if args.threads:
        args.overrides = [*args.overrides, f"serve.torch_threads={args.threads}"]
    serve_app = load_serve_app()
    serve_app.serve_forever(args.ckpt, args.host, args.port, config=args.config, overrides=args.overrides,
                            store=args.store, storage_options=parse_storage_options(args.storage_options) or None,
                            address=args.address, num_cpus=args.num_cpus, dashboard=args.dashboard)
    return 0
