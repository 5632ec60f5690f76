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


def extract_mesh(params: Tensor, cfg: P2NConfig, resolution: int = 96, level: float | None = None):
    """Marching cubes on the density field, with vertex colours from the colour MLP.

    ``level``: the density iso-value (default: the density at which a sample step reaches 50% opacity).
    Returns a ``trimesh.Trimesh`` in world units. Raises ``P2NError`` when the field is empty.
    """
    import numpy as np
    import torch
    import trimesh
    from skimage.measure import marching_cubes

    from p2n.errors import P2NError
    from p2n.nerf.render import sample_step

    nerf = NeRFField(cfg.field)
    s = cfg.field.aabb_scale
    if level is None:
        level = float(np.log(2.0) / sample_step(s, cfg.render.num_samples))
    lin = torch.linspace(-s, s, resolution)
    pts = torch.stack(torch.meshgrid(lin, lin, lin, indexing="ij"), -1).reshape(-1, 3)
    p = nerf.layout.unflatten(params.detach().float().cpu())
    with torch.no_grad():
        sigma = torch.cat([nerf.density(pts[i:i + 65536], p) for i in range(0, pts.shape[0], 65536)])
    vol = sigma.reshape(resolution, resolution, resolution).numpy()
    if not (vol.max() > level > vol.min()):
        raise P2NError(f"the NeRF has no surface at density {level:.3g} (max density {vol.max():.3g}); "
                       "nothing to mesh")
    spacing = (2 * s / (resolution - 1),) * 3
    verts, faces, normals, _ = marching_cubes(vol, level=level, spacing=spacing)
    verts = verts - s
    with torch.no_grad():
        _, rgb = nerf(torch.from_numpy(verts.astype(np.float32)), p)
    colors = (rgb.clamp(0, 1).numpy() * 255).astype(np.uint8)
    colors = np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], 1)
    return trimesh.Trimesh(vertices=verts, faces=faces, vertex_normals=normals, vertex_colors=colors, process=False)


def save_mesh(params: Tensor, cfg: P2NConfig, out_stem: str | Path, resolution: int = 96) -> list[Path]:
    """Write ``<stem>.ply`` and ``<stem>.glb`` (vertex-coloured); returns the paths."""
    mesh = extract_mesh(params, cfg, resolution)
    stem = Path(out_stem)
    paths = [stem.with_suffix(".ply"), stem.with_suffix(".glb")]
    mesh.export(paths[0])
    mesh.export(paths[1])
    return paths
