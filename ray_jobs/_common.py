"""What every Ray job shares: making ``p2n`` importable when run as ``python ray_jobs/<job>.py``, connecting to
(or starting) Ray, and pyarrow filesystems for fsspec URIs."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]


def ensure_repo_on_path() -> None:
    """``python ray_jobs/x.py`` puts ray_jobs/ (not the repo root) on sys.path; add the root so ``p2n`` and
    ``ray_jobs`` import from the working tree (``ray job submit --working-dir .``) without an install."""
    root = str(REPO_ROOT)
    if root not in sys.path:
        sys.path.insert(0, root)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> bool:
    """Connect to Ray: an already initialised session, else ``address``, else ``RAY_ADDRESS`` (set inside
    ``ray job submit``), else a local embedded Ray with ``num_cpus`` (default: every core).

    Returns True when this call started or connected (so the caller shuts it down), False when it reused one.
    """
    import ray

    if ray.is_initialized():
        return False
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, include_dashboard=False)
    return True


def pyarrow_filesystem(fs: Any):
    """An fsspec filesystem as a pyarrow one (what Ray Data's ``read_parquet``/``write_parquet`` take)."""
    import pyarrow.fs

    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))


def cpus_per_worker(explicit: float | None, workers: int) -> float:
    """CPUs to reserve per actor: ``explicit`` when set, else 1, less when that would take every CPU of the
    cluster (a pool that holds all CPUs starves Ray Data's other tasks and hangs: NOTES-RAY.md)."""
    if explicit:
        return float(explicit)
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return round(max(0.05, min(1.0, (total - 0.25) / workers)), 3)


def die_once(spec: str | None, keys: list[str]) -> None:
    """Fault injection for tests: ``spec = "<key>@<marker path>"`` (from an environment variable of the driver,
    e.g. ``P2N_BUILD_KILL_ONCE``) kills the worker process the first time it is handed that key (the marker file
    records that it happened), as a lost node would."""
    if not spec or "@" not in spec:
        return
    key, marker = spec.rsplit("@", 1)
    if key in keys and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)


def job_main(prog: str, doc: str, add_arguments, to_kwargs, run, argv: list[str] | None = None) -> int:
    """A job script's ``main``: parse its flags (the same as its ``p2n`` command's), run it, print the JSON line;
    a ``P2NError`` becomes one ``prog: error: ...`` line and exit code 2."""
    import argparse

    from p2n.cli.common import print_json
    from p2n.errors import P2NError

    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        print_json(run(**to_kwargs(args)))
    except P2NError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
