"""Turning a NeRF parameter vector into things people keep: turntable animations, contact images, meshes.

Does not own: rendering maths (``p2n.nerf.render``) or file encodings of pictures (``p2n.viz``).
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from p2n.cameras import ring_rig
from p2n.config import P2NConfig
from p2n.nerf.field import NeRFField
from p2n.nerf.render import OccupancyGrid, render_image
from p2n.viz import save_animation


def turntable_frames(params: Tensor, cfg: P2NConfig, num_frames: int = 24, size: int | None = None,
                     elevation_deg: float = 25.0) -> Tensor:
    """RGB frames [num_frames, S, S, 3] of the object spinning once, over ``cfg.render.background``."""
    size = size or cfg.scene.image_size
    cams = ring_rig(num_frames, cfg.scene.camera_radius, elevation_deg, size, size, cfg.scene.fov_deg)
    nerf = NeRFField(cfg.field)
    grid = OccupancyGrid.from_params(nerf, params, cfg.render)
    rgb, _ = render_image(nerf, params, cams, cfg.render, grid)
    return rgb


def save_turntable(params: Tensor, cfg: P2NConfig, path: str | Path, num_frames: int = 24, size: int | None = None) -> Path:
    return save_animation(turntable_frames(params, cfg, num_frames, size), path)


__all__ = ["turntable_frames", "save_turntable"]
