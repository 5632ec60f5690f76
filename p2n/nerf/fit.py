"""Fitting one object's NeRF from the shared initialization.

Every fit starts from ``init_params(field_cfg, fit_cfg.init_seed)`` — the same vector for every object — and
optimises it against posed RGBA views. What makes this fast on a CPU: an occupancy grid carved from the views'
silhouettes and refreshed from density, a random background colour per ray (so free space is learned as
transparent, not white), and a light empty-space penalty that writes "nothing here" into the parameters
themselves, so the vector renders the same without the silhouettes that produced it. Those three pieces
(:class:`PosedRays`, :func:`carved_grid`, :class:`EmptySpace`) are public: the refinement loop's ``multiview``
guidance reuses them.

Does not own: rendering maths (``render.py``) or where the views come from (``p2n.scenes``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from p2n.cameras import Views, rays
from p2n.config import P2NConfig, resolve_device
from p2n.errors import P2NError
from p2n.malloc import keep_freed_memory
from p2n.nerf.field import NeRFField, init_params
from p2n.nerf.params import check_finite
from p2n.nerf.render import OccupancyGrid, composite, psnr, render_image, render_rays, sample_step


class FitError(P2NError):
    """Fitting could not produce a usable NeRF (diverged to NaN, or the views are unusable)."""


@dataclass
class FitResult:
    params: Tensor  # [P] float32
    psnr_test: float  # mean over the held-out views (nan when none were given)
    psnr_test_views: list[float]
    psnr_train: float  # running PSNR of the last training batches
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)


@dataclass
class RayBatch:
    """Rays with their ground-truth colour over a per-ray background."""

    rays_o: Tensor  # [R, 3]
    rays_d: Tensor  # [R, 3]
    background: Tensor  # [R, 3]
    target: Tensor  # [R, 3]: the views' RGBA composited over ``background``


class PosedRays:
    """Every pixel of posed RGBA views as a ray with its colour; :meth:`sample` draws random training batches.

    Each sampled ray gets a random background colour (the target is composited over the same colour), so the
    field can only match every background by being transparent where the views are: free space is learned as
    empty, not white. Shared by :func:`fit` and the refinement loop's ``multiview`` guidance.
    """

    def __init__(self, views: Views, device: torch.device | str = "cpu"):
        o, d = rays(views.cameras)
        self.device = torch.device(device)
        self.rays_o = o.reshape(-1, 3).to(self.device)  # [N*H*W, 3]
        self.rays_d = d.reshape(-1, 3).to(self.device)
        self.rgba = views.images.reshape(-1, 4).to(self.device)  # [N*H*W, 4] straight alpha

    def __len__(self) -> int:
        return self.rays_o.shape[0]

    def sample(self, n: int, generator: torch.Generator) -> RayBatch:
        idx = torch.randint(0, len(self), (n,), generator=generator).to(self.device)
        bg = torch.rand((n, 3), generator=generator).to(self.device)
        return RayBatch(self.rays_o[idx], self.rays_d[idx], bg, composite(self.rgba[idx], bg))


def carved_grid(views: Views, cfg: P2NConfig, device: torch.device | str = "cpu") -> OccupancyGrid:
    """An occupancy grid carved to the visual hull of ``views``' silhouettes."""
    return OccupancyGrid(cfg.render.occupancy_resolution, cfg.field.aabb_scale).carve(views).to(device)


class EmptySpace:
    """The cells a carved grid proves empty (outside some silhouette); :meth:`penalty` pushes their optical
    thickness to zero, which writes "nothing here" into the parameters themselves."""

    def __init__(self, grid: OccupancyGrid, step_size: float):
        self.step_size = step_size
        self.cells = (~grid.allowed).reshape(-1).nonzero()[:, 0]
        self.cell = 2 * grid.scale / grid.res
        self.centers = grid.cell_centers()

    def penalty(self, nerf: NeRFField, params: Tensor | dict[str, Tensor], n: int,
                generator: torch.Generator) -> Tensor | None:
        """Mean optical thickness (per sample step, clamped) at ``n`` jittered points in empty cells; None when the
        silhouettes prove nothing empty."""
        if not self.cells.numel():
            return None
        pick = self.cells[torch.randint(0, self.cells.numel(), (n,), generator=generator)]
        dev = self.centers.device
        pts = self.centers[pick] + ((torch.rand((pick.numel(), 3), generator=generator) - 0.5) * self.cell).to(dev)
        return (nerf.density(pts, params) * self.step_size).clamp(max=10).mean()


def _check_views(views: Views, what: str) -> None:
    if len(views) == 0:
        raise FitError(f"no {what} views to fit")
    if not torch.isfinite(views.images).all():
        raise FitError(f"{what} views contain NaN/inf pixels")


def evaluate(params: Tensor, views: Views, cfg: P2NConfig) -> list[float]:
    """PSNR of each view rendered from ``params`` alone (grid from its own density) over ``cfg.render.background``."""
    nerf = NeRFField(cfg.field)
    rgb, _ = render_image(nerf, params, views.cameras, cfg.render)
    gt = composite(views.images, cfg.render.background)
    return psnr(rgb, gt).tolist()


def fit(train: Views, cfg: P2NConfig, test: Views | None = None, init: Tensor | None = None,
        progress: bool = False, on_step: Callable[[int, dict], None] | None = None) -> FitResult:
    """Fit a NeRF to ``train`` views; report PSNR on ``test`` views. ``init`` overrides the shared init."""
    _check_views(train, "training")
    keep_freed_memory()
    fc, rc = cfg.fit, cfg.render
    if fc.num_threads:
        torch.set_num_threads(fc.num_threads)
    nerf = NeRFField(cfg.field)
    t_start = time.perf_counter()
    gen = torch.Generator().manual_seed(fc.seed)

    dev = torch.device(resolve_device(fc.device))
    params = (init_params(cfg.field, fc.init_seed) if init is None else init.detach().float().clone()).to(dev)
    if params.numel() != nerf.num_params:
        raise FitError(f"initial parameters have {params.numel()} values, the field needs {nerf.num_params}")
    params.requires_grad_(True)
    opt = torch.optim.Adam([params], lr=fc.lr, betas=(0.9, 0.99), eps=1e-15)
    gamma = fc.lr_final_factor ** (1.0 / max(fc.steps, 1))
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)

    posed = PosedRays(train, dev)
    grid = carved_grid(train, cfg, dev)
    step_size = sample_step(cfg.field.aabb_scale, rc.num_samples)
    empty = EmptySpace(grid, step_size)

    history: list[dict] = []
    ema = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=fc.steps, desc="fit", unit="step", leave=False)
    step = 0
    for step in range(1, fc.steps + 1):
        batch = posed.sample(fc.rays_per_step, gen)
        out = render_rays(nerf, params, batch.rays_o, batch.rays_d, batch.background, rc, grid, jitter=gen)
        loss = torch.mean((out["rgb"] - batch.target) ** 2)
        mse = loss.detach()
        penalty = empty.penalty(nerf, params, fc.rays_per_step // 4, gen)
        if penalty is not None:
            loss = loss + fc.empty_weight * penalty
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not torch.isfinite(params).all():
            raise FitError(f"fitting diverged at step {step} (NaN parameters); lower fit.lr (now {fc.lr})")
        p = -10 * math.log10(max(mse.item(), 1e-10))
        ema = p if ema is None else 0.9 * ema + 0.1 * p
        if step % fc.occupancy_update_every == 0:
            grid.update(nerf, params, step_size, rc.occupancy_threshold, fc.occupancy_decay, gen)
        if step % 10 == 0 or step == 1:
            rec = {"step": step, "loss": float(loss.detach()), "psnr_train": ema,
                   "samples_per_ray": float(out["num_samples"]) / fc.rays_per_step,
                   "seconds": time.perf_counter() - t_start}
            history.append(rec)
            if on_step:
                on_step(step, rec)
        if bar:
            bar.update(1)
            bar.set_postfix(psnr=f"{ema:.1f}")
        if fc.target_psnr is not None and ema >= fc.target_psnr and step >= 50:
            break
    if bar:
        bar.close()
    params = params.detach().cpu()
    try:
        check_finite(params)
    except P2NError as e:
        raise FitError(str(e)) from None
    views_psnr = evaluate(params, test, cfg) if test is not None and len(test) else []
    return FitResult(
        params=params,
        psnr_test=float(sum(views_psnr) / len(views_psnr)) if views_psnr else float("nan"),
        psnr_test_views=views_psnr,
        psnr_train=float(ema or 0.0),
        steps=step,
        seconds=time.perf_counter() - t_start,
        history=history,
    )
