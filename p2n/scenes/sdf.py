"""Exact signed distance functions of the catalogue's shapes, in a unit local frame.

Every shape is centred on its local origin, symmetric about the local Z axis (up to its yaw) and fits inside the
cylinder ``radius <= 1, |z| <= 1``, so a primitive of scale ``size`` at any yaw stays within ``size`` of its
centre horizontally. The distances are exact (Inigo Quilez's formulas), which is what lets the renderer sphere
trace with full steps and still hit silhouettes to within its epsilon.

Owns shape geometry only; colours and names are in :mod:`p2n.scenes.vocab`, placement in
:mod:`p2n.scenes.catalogue`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

# Dimensions in the unit local frame; tests build independent inside-tests from these.
BOX_HALF = 1 / math.sqrt(2)  # a cube whose horizontal diagonal is the unit circle
CYLINDER_RADIUS, CYLINDER_HALF_HEIGHT = 0.8, 0.8
CONE_RADIUS, CONE_HALF_HEIGHT = 0.9, 0.9  # base at -z, apex at +z
TORUS_MAJOR, TORUS_MINOR = 0.7, 0.3  # lying flat: its axis is local Z
CAPSULE_RADIUS, CAPSULE_HALF_SEGMENT = 0.5, 0.45
PYRAMID_HALF_BASE, PYRAMID_HALF_HEIGHT = 1 / math.sqrt(2), 0.8  # square base at -z, apex at +z


def _sphere(p: Tensor) -> Tensor:
    return p.norm(dim=-1) - 1.0


def _box(p: Tensor) -> Tensor:
    q = p.abs() - BOX_HALF
    return q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0)


def _cylinder(p: Tensor) -> Tensor:
    dr = p[..., :2].norm(dim=-1) - CYLINDER_RADIUS
    dz = p[..., 2].abs() - CYLINDER_HALF_HEIGHT
    return torch.maximum(dr, dz).clamp(max=0) + torch.hypot(dr.clamp(min=0), dz.clamp(min=0))


def _cone(p: Tensor) -> Tensor:
    # sdCappedCone with top radius 0, in the (radial, axial) half-plane.
    h, r1 = CONE_HALF_HEIGHT, CONE_RADIUS
    qx, qy = p[..., :2].norm(dim=-1), p[..., 2]
    ca_x = qx - torch.minimum(qx, torch.where(qy < 0, torch.full_like(qx, r1), torch.zeros_like(qx)))
    ca_y = qy.abs() - h
    k2x, k2y = -r1, 2 * h  # from the apex (0, h) to the base rim (r1, -h)
    t = ((-qx) * k2x + (h - qy) * k2y) / (k2x * k2x + k2y * k2y)
    t = t.clamp(0, 1)
    cb_x, cb_y = qx + k2x * t, qy - h + k2y * t
    sign = torch.where((cb_x < 0) & (ca_y < 0), -1.0, 1.0)
    return sign * torch.sqrt(torch.minimum(ca_x**2 + ca_y**2, cb_x**2 + cb_y**2))


def _torus(p: Tensor) -> Tensor:
    return torch.hypot(p[..., :2].norm(dim=-1) - TORUS_MAJOR, p[..., 2]) - TORUS_MINOR


def _capsule(p: Tensor) -> Tensor:
    z = p[..., 2].clamp(-CAPSULE_HALF_SEGMENT, CAPSULE_HALF_SEGMENT)
    return torch.stack([p[..., 0], p[..., 1], p[..., 2] - z], dim=-1).norm(dim=-1) - CAPSULE_RADIUS


def _pyramid(p: Tensor) -> Tensor:
    # sdPyramid is written for a base of side 1 on y = 0 with the apex at y = h; scale ours onto it.
    k = 2 * PYRAMID_HALF_BASE
    h = 2 * PYRAMID_HALF_HEIGHT / k
    x, y, z = p[..., 0].abs() / k, (p[..., 2] + PYRAMID_HALF_HEIGHT) / k, p[..., 1].abs() / k
    x, z = torch.maximum(x, z) - 0.5, torch.minimum(x, z) - 0.5
    m2 = h * h + 0.25
    qx, qy, qz = z, h * y - 0.5 * x, h * x + 0.5 * y
    s = (-qx).clamp(min=0)
    t = ((qy - 0.5 * z) / (m2 + 0.25)).clamp(0, 1)
    a = m2 * (qx + s) ** 2 + qy**2
    b = m2 * (qx + 0.5 * t) ** 2 + (qy - m2 * t) ** 2
    d2 = torch.where(torch.minimum(qy, -qx * m2 - qy * 0.5) > 0, torch.zeros_like(a), torch.minimum(a, b))
    return k * torch.sqrt((d2 + qz**2) / m2) * torch.sign(torch.maximum(qz, -y))


@dataclass(frozen=True)
class ShapeGeometry:
    sdf: Callable[[Tensor], Tensor]  # local points [..., 3] -> signed distance [...], negative inside
    radius: float  # largest distance from the local Z axis
    z_min: float
    z_max: float


SHAPES: dict[str, ShapeGeometry] = {
    "sphere": ShapeGeometry(_sphere, 1.0, -1.0, 1.0),
    "cube": ShapeGeometry(_box, BOX_HALF * math.sqrt(2), -BOX_HALF, BOX_HALF),
    "cylinder": ShapeGeometry(_cylinder, CYLINDER_RADIUS, -CYLINDER_HALF_HEIGHT, CYLINDER_HALF_HEIGHT),
    "cone": ShapeGeometry(_cone, CONE_RADIUS, -CONE_HALF_HEIGHT, CONE_HALF_HEIGHT),
    "torus": ShapeGeometry(_torus, TORUS_MAJOR + TORUS_MINOR, -TORUS_MINOR, TORUS_MINOR),
    "capsule": ShapeGeometry(_capsule, CAPSULE_RADIUS, -CAPSULE_HALF_SEGMENT - CAPSULE_RADIUS,
                             CAPSULE_HALF_SEGMENT + CAPSULE_RADIUS),
    "pyramid": ShapeGeometry(_pyramid, PYRAMID_HALF_BASE * math.sqrt(2), -PYRAMID_HALF_HEIGHT, PYRAMID_HALF_HEIGHT),
}


def to_local(points: Tensor, center: tuple[float, float, float], yaw_deg: float, size: float) -> Tensor:
    """World points [..., 3] -> a primitive's unit local frame (undo translation, yaw about +Z, then scale)."""
    c, s = math.cos(math.radians(yaw_deg)), math.sin(math.radians(yaw_deg))
    d = points - torch.tensor(center, dtype=points.dtype)
    x, y = c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]
    return torch.stack([x, y, d[..., 2]], dim=-1) / size
