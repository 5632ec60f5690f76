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
