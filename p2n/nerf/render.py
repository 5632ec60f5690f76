"""Volume rendering of a NeRF field: ray/box clipping, stratified sampling, occupancy skipping, compositing.

The occupancy grid is what makes CPU fitting feasible: samples in empty cells are never sent to the field. A
grid comes from one of two places: during fitting, from the training views' silhouettes (carving) intersected
with the field's running density; for any parameter vector (fitted, decoded, generated) from that vector's own
density (:meth:`OccupancyGrid.from_params`), so a NeRF renders the same wherever it comes from.

Does not own: the field (``field.py``) or camera rays (``p2n.cameras``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from p2n.cameras import Cameras, Views, rays
from p2n.config import RenderConfig
from p2n.nerf.field import NeRFField

NEAR = 0.05


def ray_box(rays_o: Tensor, rays_d: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Entry/exit distances of rays [R, 3] through the cube [-scale, scale]³ and whether they hit it."""
    inv = 1.0 / torch.where(rays_d.abs() < 1e-9, torch.full_like(rays_d, 1e-9), rays_d)
    t_a, t_b = (-scale - rays_o) * inv, (scale - rays_o) * inv
    t0 = torch.minimum(t_a, t_b).amax(-1).clamp(min=NEAR)
    t1 = torch.maximum(t_a, t_b).amin(-1)
    return t0, t1, t1 > t0


class OccupancyGrid:
    """A boolean grid over the field's cube; cells marked False are skipped when rendering."""

    def __init__(self, resolution: int, scale: float, occupied: Tensor | None = None):
        self.res, self.scale = resolution, scale
        self.occupied = torch.ones((resolution,) * 3, dtype=torch.bool) if occupied is None else occupied
        self.allowed = torch.ones_like(self.occupied)  # cells the silhouettes permit; never re-enabled outside
        self.density = torch.zeros((resolution,) * 3)

    def to(self, device) -> "OccupancyGrid":
        self.occupied, self.allowed, self.density = (t.to(device) for t in (self.occupied, self.allowed, self.density))
        return self

    def cell_centers(self) -> Tensor:  # [G³, 3] world coordinates
        c = (torch.arange(self.res, dtype=torch.float32, device=self.occupied.device) + 0.5) / self.res * 2 * self.scale - self.scale
        return torch.stack(torch.meshgrid(c, c, c, indexing="ij"), -1).reshape(-1, 3)

    def query(self, pts: Tensor) -> Tensor:
        """Occupancy of world points [..., 3] → bool [...]."""
        ijk = ((pts + self.scale) / (2 * self.scale) * self.res).long().clamp(0, self.res - 1)
        return self.occupied[ijk[..., 0], ijk[..., 1], ijk[..., 2]]

    def carve(self, views: Views, dilate_px: int = 2) -> "OccupancyGrid":
        """Keep only cells whose centre projects inside every view's (dilated) alpha mask (the visual hull)."""
        alpha = views.images[..., 3:4].permute(0, 3, 1, 2)  # [N, 1, H, W]
        k = 2 * dilate_px + 1
        mask = F.max_pool2d(alpha, k, stride=1, padding=dilate_px)[:, 0] > 0.5  # [N, H, W]
        pts = self.cell_centers()
        keep = torch.ones(pts.shape[0], dtype=torch.bool)
        cams = views.cameras
        w2c = torch.linalg.inv(cams.c2w)
        for i in range(len(cams)):
            pc = pts @ w2c[i, :3, :3].T + w2c[i, :3, 3]
            z = -pc[:, 2]
            u = cams.fx[i] * pc[:, 0] / z + cams.cx[i]
            v = -cams.fy[i] * pc[:, 1] / z + cams.cy[i]
            inside = (z > 0) & (u >= 0) & (u < cams.width) & (v >= 0) & (v < cams.height)
            ui, vi = u.long().clamp(0, cams.width - 1), v.long().clamp(0, cams.height - 1)
            keep &= ~inside | mask[i, vi, ui]
        self.allowed = self.allowed & keep.reshape(self.occupied.shape)
        self.occupied = self.occupied & self.allowed
        return self

    @torch.no_grad()
    def update(self, field: NeRFField, params: Tensor, step_size: float, threshold: float, decay: float,
               generator: torch.Generator | None = None) -> None:
        """Refresh from the field's density at jittered cell positions (an EMA of maxima, then a 1-cell dilation)."""
        pts = self.cell_centers()
        cell = 2 * self.scale / self.res
        pts = pts + ((torch.rand(pts.shape, generator=generator) - 0.5) * cell).to(pts.device)
        sigma = _chunked_density(field, params, pts).reshape(self.density.shape)
        self.density = torch.maximum(self.density * decay, sigma) * self.allowed
        self._threshold(step_size, threshold)

    def _threshold(self, step_size: float, threshold: float) -> None:
        occ = (self.density * step_size > threshold).float()[None, None]
        self.occupied = (F.max_pool3d(occ, 3, stride=1, padding=1)[0, 0] > 0) & self.allowed

    @classmethod
    @torch.no_grad()
    def from_params(cls, field: NeRFField, params: Tensor, cfg: RenderConfig) -> "OccupancyGrid":
        """The grid implied by a parameter vector alone: max density over 2³ fixed sub-points per cell."""
        grid = cls(cfg.occupancy_resolution, field.cfg.aabb_scale).to(params.device)
        cell = 2 * grid.scale / grid.res
        centers = grid.cell_centers()
        offs = torch.tensor([[x, y, z] for x in (-0.25, 0.25) for y in (-0.25, 0.25) for z in (-0.25, 0.25)],
                            device=params.device) * cell
        sigma = torch.stack([_chunked_density(field, params, centers + o) for o in offs]).amax(0)
        grid.density = sigma.reshape(grid.density.shape)
        grid._threshold(sample_step(field.cfg.aabb_scale, cfg.num_samples), cfg.occupancy_threshold)
        return grid


def _chunked_density(field: NeRFField, params: Tensor, pts: Tensor, chunk: int = 65536) -> Tensor:
    p = field.layout.unflatten(params.detach().to(pts.device))
    return torch.cat([field.density(pts[i:i + chunk], p) for i in range(0, pts.shape[0], chunk)])


def sample_step(scale: float, num_samples: int) -> float:
    """The typical distance between samples: the cube's diagonal split into ``num_samples``."""
    return 2 * scale * 3**0.5 / num_samples


def render_rays(field: NeRFField, params: Tensor | dict[str, Tensor], rays_o: Tensor, rays_d: Tensor,
                background: Tensor, cfg: RenderConfig, grid: OccupancyGrid | None = None,
                jitter: torch.Generator | None = None) -> dict[str, Tensor]:
    """Render rays [R, 3] against ``background`` ([3] or [R, 3]); ``jitter`` enables stratified sampling.

    Returns ``rgb`` [R, 3], ``acc`` [R] (opacity) and ``depth`` [R] (expected distance; far for empty rays).
    """
    p = params if isinstance(params, dict) else field.layout.unflatten(params)
    r, s = rays_o.shape[0], cfg.num_samples
    t0, t1, hit = ray_box(rays_o, rays_d, field.cfg.aabb_scale)
    t1 = torch.where(hit, t1, t0)
    u = torch.arange(s, dtype=rays_o.dtype, device=rays_o.device)
    u = u + (torch.rand((r, s), generator=jitter).to(rays_o.device) if jitter is not None else 0.5)
    t = t0[:, None] + (t1 - t0)[:, None] * (u / s)  # [R, S]
    delta = ((t1 - t0) / s)[:, None]  # [R, 1]
    pts = rays_o[:, None, :] + rays_d[:, None, :] * t[..., None]  # [R, S, 3]
    valid = hit[:, None].expand(r, s)
    if grid is not None:
        valid = valid & grid.query(pts)
    sigma_v, rgb_v = field(pts[valid], p)
    sigma = torch.zeros((r, s), dtype=sigma_v.dtype, device=rays_o.device).masked_scatter(valid, sigma_v)
    rgb = torch.zeros((r, s, 3), dtype=rgb_v.dtype, device=rays_o.device).masked_scatter(valid[..., None], rgb_v)
    alpha = 1.0 - torch.exp(-sigma * delta)
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), 1.0 - alpha + 1e-10], 1), 1)[:, :-1]
    w = alpha * trans  # [R, S]
    acc = w.sum(1)
    bg = background.to(rays_o.device).expand(r, 3)
    color = (w[..., None] * rgb).sum(1) + (1.0 - acc)[:, None] * bg
    depth = (w * t).sum(1) + (1.0 - acc) * t1
    return {"rgb": color, "acc": acc, "depth": depth, "num_samples": valid.sum()}


@torch.no_grad()
def render_image(field: NeRFField, params: Tensor, cameras: Cameras, cfg: RenderConfig,
                 grid: OccupancyGrid | None = None, background: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Render every camera in bounded chunks of ``cfg.chunk_rays`` rays.

    Returns RGB over the background [N, H, W, 3] and opacity [N, H, W].
    """
    if grid is None:
        grid = OccupancyGrid.from_params(field, params, cfg)
    bg = torch.tensor(cfg.background, dtype=torch.float32) if background is None else background
    o, d = rays(cameras)
    shape = o.shape[:-1]
    o, d = o.reshape(-1, 3).to(params.device), d.reshape(-1, 3).to(params.device)
    p = field.layout.unflatten(params.detach())
    out_rgb, out_acc = [], []
    for i in range(0, o.shape[0], cfg.chunk_rays):
        res = render_rays(field, p, o[i:i + cfg.chunk_rays], d[i:i + cfg.chunk_rays], bg, cfg, grid)
        out_rgb.append(res["rgb"])
        out_acc.append(res["acc"])
    rgb = torch.cat(out_rgb).reshape(*shape, 3).clamp(0, 1).cpu()
    acc = torch.cat(out_acc).reshape(shape).clamp(0, 1).cpu()
    return rgb, acc


def composite(images: Tensor, background: tuple[float, float, float] | Tensor) -> Tensor:
    """Straight-alpha RGBA [..., 4] over a background colour → RGB [..., 3]."""
    bg = torch.as_tensor(background, dtype=images.dtype, device=images.device)
    a = images[..., 3:4]
    return images[..., :3] * a + bg * (1 - a)


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """PSNR in dB over the last three dims (images in [0, 1]); one value per leading index."""
    mse = ((a - b) ** 2).flatten(-3).mean(-1).clamp(min=1e-10)
    return -10.0 * torch.log10(mse)
