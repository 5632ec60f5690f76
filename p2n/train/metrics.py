"""Measuring and recording training: decoded-render PSNR of parameter vectors against an object's stored views,
sums reduced across workers, and the files a run leaves in ``--out`` (``metrics.jsonl``, ``loss.png``).

Evaluation always renders with ``p2n.nerf.render.render_image`` (occupancy grid from the vector's own density)
over ``render.background`` and compares with ``composite(views.images, background)`` — the same way the dataset's
``psnr_test`` was measured — on the first ``train.eval_views`` views.

Does not own: rendering, or where the files go (``p2n.data.storage``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Any, Iterable

import torch
from torch import Tensor

from p2n.cameras import Views
from p2n.config import RenderConfig
from p2n.data import storage
from p2n.nerf.field import NeRFField
from p2n.nerf.render import composite, psnr, render_image
from p2n.train.data import all_sum


def view_subset(views: Views, n: int) -> Views:
    k = min(n, len(views)) if n > 0 else len(views)
    return views if k == len(views) else Views(views.images[:k], views.cameras[list(range(k))])


@torch.no_grad()
def render_psnr(field: NeRFField, params: Tensor, views: Views, render_cfg: RenderConfig) -> float:
    """Mean PSNR over ``views`` of ``params`` ``[P]`` rendered on its own (grid from its density)."""
    rgb, _ = render_image(field, params.detach().float().cpu().clone(), views.cameras, render_cfg)
    gt = composite(views.images, render_cfg.background)
    return float(psnr(rgb, gt).mean())


class Averager:
    """Sums of named values (and their counts) reduced over workers: ``mean()`` is the global average."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, name: str, value: float) -> None:
        if math.isfinite(value):
            self.sums[name] = self.sums.get(name, 0.0) + value
            self.counts[name] = self.counts.get(name, 0.0) + 1.0

    def mean(self, names: Iterable[str], device: torch.device | None = None) -> dict[str, float]:
        """Global means of ``names`` (every worker must call with the same names, in the same order)."""
        names = list(names)
        if not names:
            return {}
        s = torch.tensor([self.sums.get(n, 0.0) for n in names] + [self.counts.get(n, 0.0) for n in names],
                         dtype=torch.float64)
        s = all_sum(s, device)
        k = len(names)
        return {n: (float(s[i] / s[k + i]) if s[k + i] > 0 else float("nan")) for i, n in enumerate(names)}


def reduce_means(values: dict[str, float], device: torch.device | None = None) -> dict[str, float]:
    """Average per-worker scalars over workers (every worker passes the same keys)."""
    avg = Averager()
    for k, v in values.items():
        avg.add(k, float(v))
    return avg.mean(sorted(values), device)


def _plain(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def write_run_files(out_uri: str, history: list[dict[str, Any]], title: str,
                    storage_options: dict[str, Any] | None = None, config: dict[str, Any] | None = None) -> None:
    """``OUT/metrics.jsonl`` (one JSON record per line), ``OUT/loss.png`` (loss curves) from ``history``, and
    ``OUT/config.json`` (the run's config) when given."""
    from p2n.viz import plot_curves

    fs, root = storage.url_to_fs(out_uri, storage_options)
    if config is not None:
        storage.write_bytes_atomic(fs, storage.join(root, "config.json"), json.dumps(config, indent=1).encode())
    lines = "".join(json.dumps({k: _plain(v) for k, v in r.items()}) + "\n" for r in history)
    storage.write_bytes_atomic(fs, storage.join(root, "metrics.jsonl"), lines.encode())
    train = [r for r in history if r.get("kind") == "train"]
    keys = [k for k in ("loss", "recon", "kl", "render") if any(k in r for r in train)]
    curves = {}
    for k in keys:
        pts = [(r["step"], r[k]) for r in train if k in r and r[k] is not None and r[k] > 0]
        if pts:
            curves[f"log10 {k}"] = ([p[0] for p in pts], [math.log10(p[1]) for p in pts])
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "loss.png")
        plot_curves(curves, path, xlabel="step", ylabel="log10 loss", title=title)
        with open(path, "rb") as f:
            storage.write_bytes_atomic(fs, storage.join(root, "loss.png"), f.read())
