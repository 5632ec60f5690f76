"""The shape SDFs are exact: right sign (against independent inside-tests), unit gradient, and stepping back
along the gradient by the distance lands on the surface. The renderer's full-step sphere tracing relies on it."""

import math

import pytest
import torch

from p2n.scenes import sdf
from p2n.scenes.catalogue import Primitive
from p2n.scenes.sdf import SHAPES
from p2n.scenes.vocab import SHAPE_WORDS


def _inside(shape: str, p: torch.Tensor) -> torch.Tensor:
    x, y, z = p.unbind(-1)
    rho = torch.hypot(x, y)
    if shape == "sphere":
        return p.norm(dim=-1) < 1
    if shape == "cube":
        return p.abs().amax(dim=-1) < sdf.BOX_HALF
    if shape == "cylinder":
        return (rho < sdf.CYLINDER_RADIUS) & (z.abs() < sdf.CYLINDER_HALF_HEIGHT)
    if shape == "cone":
        h = sdf.CONE_HALF_HEIGHT
        return (z.abs() < h) & (rho < sdf.CONE_RADIUS * (h - z) / (2 * h))
    if shape == "torus":
        return (rho - sdf.TORUS_MAJOR) ** 2 + z**2 < sdf.TORUS_MINOR**2
    if shape == "capsule":
        a = sdf.CAPSULE_HALF_SEGMENT
        return torch.hypot(rho, z - z.clamp(-a, a)) < sdf.CAPSULE_RADIUS
    if shape == "pyramid":
        h = sdf.PYRAMID_HALF_HEIGHT
        return (z.abs() < h) & (torch.maximum(x.abs(), y.abs()) < sdf.PYRAMID_HALF_BASE * (h - z) / (2 * h))
    raise AssertionError(shape)


def test_every_named_shape_has_geometry():
    assert set(SHAPES) == set(SHAPE_WORDS)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_sdf_is_exact(shape):
    g = torch.Generator().manual_seed(0)
    p = (torch.rand(4000, 3, generator=g, dtype=torch.float64) * 2 - 1) * 1.3
    f = SHAPES[shape].sdf
    d = f(p)
    clear = d.abs() > 1e-3  # the sign right at the surface is a coin flip for either test
    assert torch.equal(d[clear] < 0, _inside(shape, p[clear]))
    assert (d < 0).float().mean() > 0.02  # the sample really probes the inside

    h = 1e-6
    grad = torch.stack([(f(p + e) - f(p - e)) / (2 * h) for e in torch.eye(3, dtype=torch.float64) * h], dim=-1)
    far = d.abs() > 1e-2
    assert torch.quantile((grad[far].norm(dim=-1) - 1).abs(), 0.99) < 1e-4
    surface = p[far] - d[far, None] * grad[far]
    assert torch.quantile(f(surface).abs(), 0.99) < 1e-5


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_shape_stays_inside_its_declared_bounds(shape):
    g = SHAPES[shape]
    p = (torch.rand(20000, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1) * 1.2
    inside = p[g.sdf(p) < 0]
    assert torch.hypot(inside[:, 0], inside[:, 1]).max() <= g.radius + 1e-9
    assert g.z_min - 1e-9 <= inside[:, 2].min() and inside[:, 2].max() <= g.z_max + 1e-9
    assert g.radius <= 1 and -1 <= g.z_min and g.z_max <= 1


def test_primitive_outside_the_unit_cube_is_refused():
    with pytest.raises(ValueError, match=r"outside the cube \[-1, 1\]\^3"):
        Primitive("sphere", "red", (1.0, 0.0, 0.0), 0.9, (0.2, 0.0, 0.0))
    with pytest.raises(ValueError, match="unknown shape 'hexagon'"):
        Primitive("hexagon", "red", (1.0, 0.0, 0.0), 0.5)


def test_to_local_undoes_yaw_and_scale():
    world = torch.tensor([[0.5 + 0.3 * math.cos(math.radians(30)), 0.3 * math.sin(math.radians(30)), 0.1]])
    local = sdf.to_local(world, (0.5, 0.0, 0.1), 30.0, 0.3)
    assert torch.allclose(local, torch.tensor([[1.0, 0.0, 0.0]]), atol=1e-6)
