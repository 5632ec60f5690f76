"""``multiview``: the reconstruction guidance — a photometric loss against posed views, fully offline.

This is ``p2n.nerf.fit`` run as a refinement: each step renders random pixels of the posed training views over
random backgrounds (:class:`p2n.nerf.fit.PosedRays`), inside an occupancy grid carved from their silhouettes
(:func:`p2n.nerf.fit.carved_grid`), with the same empty-space penalty (:class:`p2n.nerf.fit.EmptySpace`). What
it adds is the registry entry, so ``--guidance multiview`` is chosen like ``sds`` or ``zero123``, and the
:class:`PosedViews` ray source the loop asks for a batch each step.

Owns: the photometric loss and the posed ray source. Does not own: the ray sampling and regularisers themselves
(``p2n.nerf.fit``) or the loop (``loop.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from p2n.cameras import Views
from p2n.config import P2NConfig
from p2n.nerf.field import NeRFField
from p2n.nerf.fit import EmptySpace, PosedRays, carved_grid
from p2n.nerf.render import sample_step
from p2n.refine.guidance import Guidance, GuidanceContext, GuidanceInputError, GuidanceOutput, register_guidance
from p2n.refine.guidance.base import check_images


@dataclass
class PosedContext(GuidanceContext):
    """A context with the ground-truth colour of every rendered pixel."""

    target: Tensor | None = None  # same shape as the rendered images [B, H, W, 3]


@dataclass
class ViewBatch:
    """One step's rays and how the loop hands their colours to the guidance."""

    rays_o: Tensor  # [R, 3]
    rays_d: Tensor  # [R, 3]
    background: Tensor  # [R, 3]
    shape: tuple[int, int, int]  # (B, H, W) with B * H * W = R: the renders are reshaped to [B, H, W, 3]
    ctx: GuidanceContext


@register_guidance("multiview")
class MultiviewGuidance(Guidance):
    """Mean squared error between renders and ground truth (``PosedContext.target``), times ``guidance_scale``."""

    default_guidance_scale = 1.0
    needs_posed_views = True  # the loop feeds it PosedViews batches, not random cameras

    def __call__(self, images: Tensor, ctx: GuidanceContext, step: int, total_steps: int) -> GuidanceOutput:
        check_images(images, "multiview")
        target = getattr(ctx, "target", None)
        if target is None:
            raise GuidanceInputError("the multiview guidance needs ground-truth colours (a PosedContext with "
                                     "target); refine towards posed views: --data DIR or --scene CAPTION")
        if target.shape != images.shape:
            raise GuidanceInputError(f"multiview target {tuple(target.shape)} does not match the renders "
                                     f"{tuple(images.shape)}")
        mse = torch.mean((images - target.to(images.device)) ** 2)
        info = {"mse": float(mse.detach()), "psnr_batch": float(-10 * torch.log10(mse.detach().clamp(min=1e-10)))}
        return GuidanceOutput(loss=self.guidance_scale * mse, info=info)


class PosedViews:
    """Random pixels of posed views as the loop's rays, the carved grid they live in and the empty-space term."""

    def __init__(self, views: Views, cfg: P2NConfig, device: torch.device | str = "cpu"):
        if len(views) == 0:
            raise GuidanceInputError("the multiview guidance got no posed views")
        if not torch.isfinite(views.images).all():
            raise GuidanceInputError("the posed views contain NaN/inf pixels")
        self.cfg = cfg
        self.rays = PosedRays(views, device)
        self.grid = carved_grid(views, cfg, device)
        self.empty = EmptySpace(self.grid, sample_step(cfg.field.aabb_scale, cfg.render.num_samples))

    def sample(self, generator: torch.Generator) -> ViewBatch:
        n = self.cfg.refine.rays_per_step
        b = self.rays.sample(n, generator)
        return ViewBatch(b.rays_o, b.rays_d, b.background, (1, 1, n), PosedContext(target=b.target.reshape(1, 1, n, 3)))

    def regularizer(self, nerf: NeRFField, params: Tensor | dict[str, Tensor],
                    generator: torch.Generator) -> Tensor | None:
        """``empty_weight`` x the empty-space penalty, as ``fit`` adds it (None when nothing is proven empty)."""
        pen = self.empty.penalty(nerf, params, self.cfg.refine.rays_per_step // 4, generator)
        return None if pen is None else self.cfg.refine.empty_weight * pen
