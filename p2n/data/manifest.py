"""``manifest.json``: the dataset's table of contents, assembled from the rows' summary columns.

It holds the config the objects were fitted with, the parameter layout (version, hash, size), counts, the object
ids of each split (ok rows only: failed rows have no parameters), the failures with their errors, the PSNR
distribution and the shard list. The driver writes it after every run; a dataset without one (a run that was
cut off) gets the same dict computed on the fly with ``complete: false``.

Does not own: the rows themselves (``schema.py``) or where the file goes (``storage.py``).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Iterable

from p2n.data.schema import FORMAT, FORMAT_VERSION, SPLITS, STATUS_OK
from p2n.nerf.params import LAYOUT_VERSION


def psnr_stats(values: Iterable[float]) -> dict[str, float | None]:
    v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
    if not v:
        return {"min": None, "median": None, "mean": None, "max": None}
    return {"min": min(v), "median": statistics.median(v), "mean": statistics.fmean(v), "max": max(v)}


def make_manifest(summary: list[dict[str, Any]], shards: list[str], config: dict[str, Any] | None,
                  layout_hash: str | None, num_params: int | None, complete: bool,
                  created: str | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """The manifest for the rows summarised in ``summary`` (dicts with SUMMARY_COLUMNS) and ``shards`` (paths
    relative to the dataset root)."""
    ok = [r for r in summary if r["status"] == STATUS_OK]
    failed = [r for r in summary if r["status"] != STATUS_OK]
    splits = {s: sorted(r["object_id"] for r in ok if r["split"] == s) for s in SPLITS}
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "layout_version": LAYOUT_VERSION,
        "layout_hash": layout_hash,
        "num_params": num_params,
        "counts": {"total": len(summary), "ok": len(ok), "failed": len(failed),
                   **{s: len(v) for s, v in splits.items()}},
        "splits": splits,
        "failures": sorted(({"object_id": r["object_id"], "error": r["error"]} for r in failed),
                           key=lambda d: d["object_id"]),
        "psnr_test": psnr_stats(r["psnr_test"] for r in ok),
        "fit_seconds_total": float(sum(float(r["seconds"]) for r in summary)),
        "shards": sorted(shards),
        "config": config,
        "source": source or {},
        "complete": complete,
        "created": created or now,
        "updated": now,
    }
