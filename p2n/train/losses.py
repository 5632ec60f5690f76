"""Losses of both stages: the VAE's reconstruction + KL, and the decoded-render term either stage may add.

The render term renders decoded parameter vectors with the one differentiable renderer
(``p2n.nerf.render.render_rays``) against an object's stored views: random rays, a random background colour per
ray (as fitting does, so empty space must be transparent rather than white), and the occupancy grid of the
object's *fitted* parameters so samples in empty space are skipped.

Does not own: the models (``p2n.latent``, ``p2n.align``) or the renderer itself.
"""

from __future__ import annotations

import torch
from torch import Tensor

from p2n.cameras import rays
from p2n.config import RenderConfig
from p2n.nerf.field import NeRFField
from p2n.nerf.render import OccupancyGrid, composite, render_rays
from p2n.train.data import ObjectRecord, TrainError


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, exp(logvar)) || N(0, 1)), averaged over batch and latent dimensions."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).mean()


def vae_loss(out: dict[str, Tensor], x: Tensor, kl_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
    """Reconstruction MSE (mean over normalised coordinates) + ``kl_weight`` x KL (mean over latent dims)."""
    recon = (out["recon"].float() - x.float()).pow(2).mean()
    kl = kl_divergence(out["mu"].float(), out["logvar"].float())
    return recon + kl_weight * kl, {"recon": recon.detach(), "kl": kl.detach()}


class RayBank:
    """Per-object rays of the stored views and occupancy grids of the fitted parameters, built on first use."""

    def __init__(self, field: NeRFField, render_cfg: RenderConfig):
        self.field, self.render_cfg = field, render_cfg
        self._rays: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._grids: dict[str, OccupancyGrid] = {}

    def get(self, rec: ObjectRecord) -> tuple[Tensor, Tensor, Tensor, OccupancyGrid]:
        if rec.views is None:
            raise TrainError(f"object {rec.object_id} has no stored views; the render loss needs them "
                             "(set vae.render_weight / align.render_weight to 0)")
        if rec.object_id not in self._rays:
            o, d = rays(rec.views.cameras)
            self._rays[rec.object_id] = (o.reshape(-1, 3), d.reshape(-1, 3), rec.views.images.reshape(-1, 4))
            self._grids[rec.object_id] = OccupancyGrid.from_params(self.field, rec.params.clone(), self.render_cfg)
        return (*self._rays[rec.object_id], self._grids[rec.object_id])


def render_loss(bank: RayBank, params: Tensor, records: list[ObjectRecord], num_rays: int,
                gen: torch.Generator) -> Tensor:
    """Mean squared error of ``num_rays`` random rays per object rendered from ``params`` ``[B, P]`` (decoded,
    differentiable) against the objects' stored views, over a random background per ray."""
    losses = []
    for i, rec in enumerate(records):
        o, d, rgba, grid = bank.get(rec)
        idx = torch.randint(0, o.shape[0], (num_rays,), generator=gen)
        bg = torch.rand((num_rays, 3), generator=gen)
        dev = params.device
        gt = composite(rgba[idx], bg).to(dev)
        # clone(): the hash-grid encoder reads the table through an int64 view, which needs an even storage offset
        p = params[i].float().clone()
        out = render_rays(bank.field, p, o[idx].to(dev), d[idx].to(dev), bg.to(dev), bank.render_cfg, grid,
                          jitter=gen)
        losses.append((out["rgb"] - gt).pow(2).mean())
    return torch.stack(losses).mean()
