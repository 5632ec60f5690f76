"""Analytic ground-truth renders of catalogue objects: sphere tracing of exact SDFs with view-independent shading.

Rays come from :func:`p2n.cameras.rays`, the same function the NeRF renderer uses, so a fitted NeRF and its
ground truth agree about every pixel. Shading is Lambertian under a fixed world-space light plus ambient,
``rgb * (AMBIENT + DIFFUSE * max(0, n . LIGHT_DIR))``: it does not depend on the view direction, so a NeRF whose
colour ignores the view direction can fit it exactly. Images are straight-alpha RGBA; background pixels are
(0, 0, 0, 0).

Owns ray-scene intersection and shading. Does not own cameras (:mod:`p2n.cameras`), geometry
(:mod:`p2n.scenes.sdf`) or what objects exist (:mod:`p2n.scenes.catalogue`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from p2n.cameras import Cameras, Views, random_rig, rays, ring_rig
from p2n.config import SceneConfig
from p2n.scenes.captions import stable_hash
from p2n.scenes.catalogue import ObjectSpec, Primitive
from p2n.scenes.sdf import SHAPES, to_local

LIGHT_DIR = tuple(v / math.sqrt(0.4**2 + 0.3**2 + 0.85**2) for v in (0.4, 0.3, 0.85))
AMBIENT, DIFFUSE = 0.4, 0.6
HIT_EPS = 1e-4  # world units: ~1/400 of a pixel at 64 px, 40 deg fov, radius 4
NORMAL_STEP = 1e-5  # finite-difference step for normals: far below a pixel, far above float64 noise
MAX_STEPS = 1000  # only rays grazing a surface need many; the rest converge or leave in a few dozen
CHUNK_RAYS = 1 << 18  # rays traced at once: bounds memory for large rigs
TEST_ELEVATION_DEG = 30.0  # the test ring; train views are random in elevation, so this ring is unseen


def scene_sdf(primitives: tuple[Primitive, ...], points: Tensor) -> tuple[Tensor, Tensor]:
    """Distance [M] from ``points`` [M, 3] to the union of ``primitives``, and the index [M] of the nearest."""
    d = torch.stack([p.size * SHAPES[p.shape].sdf(to_local(points, p.center, p.yaw_deg, p.size))
                     for p in primitives], dim=-1)
    return d.min(dim=-1)


def _trace(primitives: tuple[Primitive, ...], o: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Sphere trace rays o, d [R, 3]: hit mask [R] and hit distance t [R]."""
    lo = torch.tensor([min(p.bounds()[0][i] for p in primitives) for i in range(3)]) - 0.01
    hi = torch.tensor([max(p.bounds()[1][i] for p in primitives) for i in range(3)]) + 0.01
    # Start at the scene's bounding box and stop when leaving it: fewer steps, and misses end for sure.
    inv = 1.0 / torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t_a, t_b = (lo - o) * inv, (hi - o) * inv
    t_near = torch.minimum(t_a, t_b).amax(dim=-1).clamp(min=0)
    t_far = torch.maximum(t_a, t_b).amin(dim=-1)
    t = t_near.clone()
    hit = torch.zeros(len(o), dtype=torch.bool)
    active = torch.nonzero(t_near < t_far).squeeze(-1)
    for _ in range(MAX_STEPS):
        if len(active) == 0:
            break
        ta = t[active]
        dist, _ = scene_sdf(primitives, o[active] + ta[:, None] * d[active])
        converged = dist < HIT_EPS
        hit[active[converged]] = True
        # Exact SDFs never overshoot, so stepping by the distance is safe.
        t[active] = ta + dist.clamp(min=0)
        active = active[~converged & (t[active] < t_far[active])]
    if len(active):  # out of steps: such rays graze a surface within a hair; call them by their distance
        dist, _ = scene_sdf(primitives, o[active] + t[active, None] * d[active])
        hit[active[dist < 10 * HIT_EPS]] = True
    return hit, t


def _shade(primitives: tuple[Primitive, ...], points: Tensor) -> Tensor:
    """View-independent colour [M, 3] of surface ``points`` [M, 3]."""
    # Central differences in float64: accurate to ~1e-9 for these SDFs, and unlike autograd they stay finite where
    # a step lands exactly on a flat face (the SDF's sqrt has an infinite slope at 0).
    p = points.double()
    steps = torch.eye(3, dtype=torch.float64) * NORMAL_STEP
    normal = torch.stack([scene_sdf(primitives, p + e)[0] - scene_sdf(primitives, p - e)[0] for e in steps], dim=-1)
    normal = (normal / normal.norm(dim=-1, keepdim=True).clamp(min=1e-30)).float()
    which = scene_sdf(primitives, points)[1]
    lambert = (normal @ torch.tensor(LIGHT_DIR)).clamp(min=0)
    albedo = torch.tensor([p.rgb for p in primitives])[which]
    return (albedo * (AMBIENT + DIFFUSE * lambert)[:, None]).clamp(0, 1)


def render_views(spec: ObjectSpec, cameras: Cameras, supersample: int = 1) -> Views:
    """Straight-alpha RGBA views [N, H, W, 4] of ``spec``; ``supersample=k`` averages k x k rays per pixel.

    With ``supersample=1`` alpha is exactly 0 or 1; with more, edge pixels get their covered fraction.
    """
    if supersample < 1:
        raise ValueError(f"supersample={supersample} must be >= 1 (rays per pixel side)")
    k = supersample
    # A camera resized by k puts its pixel centres on the k x k sub-pixel grid of the original pixels.
    o, d = rays(cameras.resized(cameras.width * k, cameras.height * k))
    shape = o.shape[:-1]
    o, d = o.reshape(-1, 3), d.reshape(-1, 3)
    rgba = torch.zeros(len(o), 4)
    with torch.no_grad():
        for s in range(0, len(o), CHUNK_RAYS):
            oc, dc = o[s:s + CHUNK_RAYS], d[s:s + CHUNK_RAYS]
            hit, t = _trace(spec.primitives, oc, dc)
            idx = torch.nonzero(hit).squeeze(-1) + s
            if len(idx):
                rgba[idx, :3] = _shade(spec.primitives, o[idx] + t[idx - s, None] * d[idx])
                rgba[idx, 3] = 1.0
    img = rgba.reshape(*shape, 4)
    if k > 1:
        # Average premultiplied colour over each pixel's k x k rays, then return to straight alpha.
        prem = torch.cat([img[..., :3] * img[..., 3:], img[..., 3:]], dim=-1).permute(0, 3, 1, 2)
        prem = F.avg_pool2d(prem, k).permute(0, 2, 3, 1)
        alpha = prem[..., 3:]
        img = torch.cat([torch.where(alpha > 0, prem[..., :3] / alpha.clamp(min=1e-12), 0.0), alpha], dim=-1)
    return Views(img.contiguous(), cameras)


def render_object(spec: ObjectSpec, cfg: SceneConfig | None = None, supersample: int = 2) -> tuple[Views, Views]:
    """(train, test) views of ``spec``: ``cfg.num_train_views`` random viewpoints (seeded by ``cfg.seed`` and the
    object id) and a ring of ``cfg.num_test_views`` at an elevation the random rig never repeats exactly."""
    cfg = cfg or SceneConfig()
    size = cfg.image_size
    train = random_rig(cfg.num_train_views, seed=stable_hash("views", cfg.seed, spec.object_id) % 2**31,
                       radius=cfg.camera_radius, width=size, height=size, fov_deg=cfg.fov_deg)
    n = cfg.num_test_views
    # Half a step of phase keeps the ring off azimuth 0, where Blender-style rigs often start.
    test = ring_rig(n, cfg.camera_radius, TEST_ELEVATION_DEG, size, size, cfg.fov_deg, phase_deg=180.0 / max(n, 1))
    return render_views(spec, train, supersample), render_views(spec, test, supersample)
