"""Lens distortion of real captures: the models a transforms.json can declare, and resampling an image to the
pinhole camera that p2n's rays assume.

Models, in nerfstudio's form (the coefficients ``k1..k4, p1, p2`` of a transforms.json; COLMAP's SIMPLE_RADIAL
and RADIAL are its special cases):

* ``perspective`` (``OPENCV``): radial ``1 + k1 r^2 + k2 r^4 + k3 r^6 + k4 r^8`` times the ideal point, plus
  tangential ``p1, p2`` — OpenCV's ``k1, k2, p1, p2[, k3]`` model;
* ``fisheye`` (``OPENCV_FISHEYE``): equidistant, ``theta_d = theta (1 + k1 theta^2 + ... + k4 theta^8)`` with
  ``theta`` the angle from the optical axis;
* ``pinhole``: none.

Resampling keeps the intrinsics: each pixel centre of the output (a pinhole image with the same ``fx, fy, cx,
cy``) is pushed through the distortion to where the lens imaged it, and the source is sampled there (bilinear,
on premultiplied colour so transparent pixels' colour does not bleed into edges). A point the lens put outside
the frame takes the nearest edge pixel; for a fisheye that means the pinhole output only covers the part of the
field of view that fits its focal length.

Does not own: reading the coefficients from json and their errors (``transforms.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

MODELS = ("pinhole", "perspective", "fisheye")


@dataclass(frozen=True)
class Lens:
    model: str = "pinhole"
    k: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    p: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"lens model {self.model!r}; expected one of {MODELS}")

    @property
    def is_pinhole(self) -> bool:
        # A fisheye with zero coefficients is still equidistant, not a pinhole.
        return self.model == "pinhole" or (self.model == "perspective" and not any(self.k) and not any(self.p))


def distort(x: Tensor, y: Tensor, lens: Lens) -> tuple[Tensor, Tensor]:
    """Ideal (pinhole) normalised image coordinates ``x = X/Z, y = Y/Z`` -> where the lens images them."""
    k1, k2, k3, k4 = lens.k
    if lens.model == "fisheye":
        r = torch.sqrt(x * x + y * y)
        theta = torch.atan(r)
        t2 = theta * theta
        theta_d = theta * (1 + t2 * (k1 + t2 * (k2 + t2 * (k3 + t2 * k4))))
        # theta_d / r -> 1 as r -> 0: the centre pixel stays put
        scale = torch.where(r > 1e-9, theta_d / r.clamp(min=1e-9), torch.ones_like(r))
        return x * scale, y * scale
    if lens.model == "pinhole":
        return x, y
    p1, p2 = lens.p
    r2 = x * x + y * y
    radial = 1 + r2 * (k1 + r2 * (k2 + r2 * (k3 + r2 * k4)))
    xd = x * radial + 2 * p1 * x * y + p2 * (r2 + 2 * x * x)
    yd = y * radial + 2 * p2 * x * y + p1 * (r2 + 2 * y * y)
    return xd, yd


def undistort(image: Tensor, fx: float, fy: float, cx: float, cy: float, lens: Lens) -> Tensor:
    """Straight-alpha RGBA ``[H, W, 4]`` taken through ``lens`` -> the same view as a pinhole camera with the
    same intrinsics (pixel centres at ``i + 0.5``, as :func:`p2n.cameras.rays` casts them)."""
    if lens.is_pinhole:
        return image
    h, w = image.shape[:2]
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64) + 0.5, torch.arange(w, dtype=torch.float64) + 0.5,
                          indexing="ij")
    xd, yd = distort((u - cx) / fx, (v - cy) / fy, lens)
    # source pixel coordinates -> grid_sample's [-1, 1] (align_corners=False: -1 is the left edge of pixel 0)
    gx = (xd * fx + cx) / w * 2 - 1
    gy = (yd * fy + cy) / h * 2 - 1
    grid = torch.stack([gx, gy], dim=-1).float()[None]
    alpha = image[..., 3:]
    prem = torch.cat([image[..., :3] * alpha, alpha], dim=-1).permute(2, 0, 1)[None]
    out = F.grid_sample(prem, grid, mode="bilinear", padding_mode="border", align_corners=False)[0].permute(1, 2, 0)
    a = out[..., 3:]
    rgb = torch.where(a > 0, out[..., :3] / a.clamp(min=1e-12), 0.0).clamp(0, 1)
    return torch.cat([rgb, a.clamp(0, 1)], dim=-1)
