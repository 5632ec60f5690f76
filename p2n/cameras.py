"""Pinhole cameras, camera rigs and ray generation: the one place p2n turns pixels into rays.

Convention (Blender / NeRF-synthetic / nerfstudio, "OpenGL"): ``c2w`` maps camera to world, the camera looks
down its local -Z axis, +Y is up and +X is right in the image. Pixel (i, j) — column i, row j — is sampled at
its centre (i + 0.5, j + 0.5). Both the analytic scene renderer and the NeRF renderer call :func:`rays`, so the
two can never disagree about a pixel.

Does not own: images (see :class:`Views`), scene content, or volume rendering.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Cameras:
    """N pinhole cameras sharing one image size; intrinsics may differ per camera."""

    c2w: Tensor  # [N, 4, 4] float32
    fx: Tensor  # [N]
    fy: Tensor  # [N]
    cx: Tensor  # [N]
    cy: Tensor  # [N]
    width: int
    height: int

    def __post_init__(self) -> None:
        n = self.c2w.shape[0]
        self.c2w = self.c2w.float()
        for name in ("fx", "fy", "cx", "cy"):
            v = torch.as_tensor(getattr(self, name), dtype=torch.float32)
            if v.ndim == 0:
                v = v.expand(n).clone()
            if v.shape != (n,):
                raise ValueError(f"Cameras.{name} has shape {tuple(v.shape)}, expected ({n},)")
            setattr(self, name, v)
        if self.c2w.shape[1:] != (4, 4):
            raise ValueError(f"Cameras.c2w has shape {tuple(self.c2w.shape)}, expected [N, 4, 4]")

    def __len__(self) -> int:
        return self.c2w.shape[0]

    def __getitem__(self, idx) -> "Cameras":
        if isinstance(idx, int):
            idx = [idx]
        return Cameras(self.c2w[idx], self.fx[idx], self.fy[idx], self.cx[idx], self.cy[idx], self.width, self.height)

    def resized(self, width: int, height: int) -> "Cameras":
        """The same cameras for an image resampled to ``width`` x ``height``."""
        sx, sy = width / self.width, height / self.height
        return Cameras(self.c2w, self.fx * sx, self.fy * sy, self.cx * sx, self.cy * sy, width, height)

    @property
    def centers(self) -> Tensor:  # [N, 3]
        return self.c2w[:, :3, 3]


@dataclass
class Views:
    """Posed images of one object: straight (not premultiplied) RGBA in [0, 1]."""

    images: Tensor  # [N, H, W, 4] float32
    cameras: Cameras

    def __post_init__(self) -> None:
        n, h, w, c = self.images.shape
        if c != 4:
            raise ValueError(f"Views.images must be RGBA [N, H, W, 4], got {tuple(self.images.shape)}")
        if n != len(self.cameras) or (w, h) != (self.cameras.width, self.cameras.height):
            raise ValueError(
                f"{n} images of {w}x{h} do not match {len(self.cameras)} cameras of "
                f"{self.cameras.width}x{self.cameras.height}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, idx) -> "Views":
        if isinstance(idx, int):
            idx = [idx]
        return Views(self.images[idx], self.cameras[idx])


def rays(cameras: Cameras) -> tuple[Tensor, Tensor]:
    """Ray origins and unit directions through every pixel centre: two [N, H, W, 3] tensors."""
    h, w = cameras.height, cameras.width
    j, i = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5, indexing="ij")
    x = (i[None] - cameras.cx[:, None, None]) / cameras.fx[:, None, None]
    y = -(j[None] - cameras.cy[:, None, None]) / cameras.fy[:, None, None]
    d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)  # [N, H, W, 3]
    rot = cameras.c2w[:, :3, :3]
    d = torch.einsum("nij,nhwj->nhwi", rot, d_cam)
    d = d / d.norm(dim=-1, keepdim=True)
    o = cameras.c2w[:, None, None, :3, 3].expand_as(d)
    return o.contiguous(), d.contiguous()


def look_at(eye: Tensor, target: Tensor | None = None, up: Tensor | None = None) -> Tensor:
    """Camera-to-world matrices [N, 4, 4] for cameras at ``eye`` [N, 3] looking at ``target`` (origin)."""
    eye = torch.as_tensor(eye, dtype=torch.float32).reshape(-1, 3)
    target = torch.zeros_like(eye) if target is None else torch.as_tensor(target, dtype=torch.float32).expand_as(eye)
    up = torch.tensor([0.0, 0.0, 1.0]) if up is None else torch.as_tensor(up, dtype=torch.float32)
    back = eye - target
    back = back / back.norm(dim=-1, keepdim=True)  # camera +Z points away from the target
    right = torch.linalg.cross(up.expand_as(back), back, dim=-1)
    # A camera straight above or below has no defined "right"; pick one rather than divide by zero.
    degenerate = right.norm(dim=-1) < 1e-6
    right[degenerate] = torch.tensor([1.0, 0.0, 0.0])
    right = right / right.norm(dim=-1, keepdim=True)
    true_up = torch.linalg.cross(back, right, dim=-1)
    c2w = torch.eye(4).repeat(eye.shape[0], 1, 1)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, true_up, back, eye
    return c2w


def focal_from_fov(fov_deg: float, size: int) -> float:
    return 0.5 * size / math.tan(0.5 * math.radians(fov_deg))


def _pinhole(c2w: Tensor, width: int, height: int, fov_deg: float) -> Cameras:
    f = focal_from_fov(fov_deg, width)
    return Cameras(c2w, f, f, width / 2, height / 2, width, height)


def ring_rig(n: int, radius: float = 4.0, elevation_deg: float = 25.0, width: int = 64, height: int = 64,
             fov_deg: float = 40.0, phase_deg: float = 0.0) -> Cameras:
    """``n`` cameras evenly spaced on a horizontal ring (world +Z up), all looking at the origin."""
    az = torch.deg2rad(torch.arange(n, dtype=torch.float32) * 360.0 / n + phase_deg)
    el = math.radians(elevation_deg)
    eye = radius * torch.stack([torch.cos(az) * math.cos(el), torch.sin(az) * math.cos(el),
                                torch.full_like(az, math.sin(el))], dim=-1)
    return _pinhole(look_at(eye), width, height, fov_deg)


def random_rig(n: int, seed: int, radius: float = 4.0, min_elevation_deg: float = -10.0,
               max_elevation_deg: float = 70.0, width: int = 64, height: int = 64, fov_deg: float = 40.0) -> Cameras:
    """``n`` cameras at uniformly random azimuths and elevations in a band, deterministic from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    az = torch.rand(n, generator=g) * 2 * math.pi
    # Uniform on the sphere's band: sample sin(elevation) uniformly.
    s0, s1 = math.sin(math.radians(min_elevation_deg)), math.sin(math.radians(max_elevation_deg))
    el = torch.asin(s0 + (s1 - s0) * torch.rand(n, generator=g))
    eye = radius * torch.stack([torch.cos(az) * torch.cos(el), torch.sin(az) * torch.cos(el), torch.sin(el)], dim=-1)
    return _pinhole(look_at(eye), width, height, fov_deg)
