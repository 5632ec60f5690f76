"""Volume rendering against closed forms, and the occupancy grid's carving."""

import math
from types import SimpleNamespace

import torch

from p2n.cameras import ring_rig
from p2n.config import FieldConfig, RenderConfig
from p2n.nerf.render import OccupancyGrid, psnr, ray_box, render_rays


class ConstantField:
    """A uniform slab: density sigma and colour rgb everywhere inside the cube."""

    def __init__(self, sigma, rgb, scale=1.5):
        self.sigma, self.rgb = sigma, torch.tensor(rgb)
        self.cfg = SimpleNamespace(aabb_scale=scale)

    def __call__(self, x, p):
        return torch.full((x.shape[0],), self.sigma), self.rgb.expand(x.shape[0], 3)


def test_uniform_slab_has_closed_form_transmittance():
    sigma, scale = 0.4, 1.5
    field = ConstantField(sigma, [0.2, 0.6, 0.9], scale)
    o = torch.tensor([[-5.0, 0.0, 0.0], [-5.0, 0.3, -0.2], [0.0, -4.0, 0.0]])
    d = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    bg = torch.tensor([1.0, 0.0, 0.0])
    out = render_rays(field, {}, o, d, bg, RenderConfig(num_samples=32))
    length = 2 * scale  # every ray crosses the full cube along an axis
    acc = 1 - math.exp(-sigma * length)
    assert torch.allclose(out["acc"], torch.full((3,), acc), atol=1e-5)
    expect = torch.tensor([0.2, 0.6, 0.9]) * acc + bg * (1 - acc)
    assert torch.allclose(out["rgb"], expect.expand(3, 3), atol=1e-5)


def test_rays_missing_the_cube_show_the_background():
    field = ConstantField(100.0, [0.0, 0.0, 0.0])
    o = torch.tensor([[-5.0, 3.0, 0.0]])
    d = torch.tensor([[1.0, 0.0, 0.0]])
    out = render_rays(field, {}, o, d, torch.tensor([0.1, 0.2, 0.3]), RenderConfig())
    assert out["acc"].item() == 0.0
    assert torch.allclose(out["rgb"], torch.tensor([[0.1, 0.2, 0.3]]))


def test_ray_box_distances():
    t0, t1, hit = ray_box(torch.tensor([[-4.0, 0, 0]]), torch.tensor([[1.0, 0, 0]]), 1.5)
    assert hit.item() and abs(t0.item() - 2.5) < 1e-6 and abs(t1.item() - 5.5) < 1e-6


def test_empty_occupancy_grid_skips_every_sample():
    field = ConstantField(5.0, [1.0, 1.0, 1.0])
    grid = OccupancyGrid(8, 1.5, torch.zeros(8, 8, 8, dtype=torch.bool))
    out = render_rays(field, {}, torch.tensor([[-5.0, 0, 0]]), torch.tensor([[1.0, 0, 0]]), torch.zeros(3),
                      RenderConfig(), grid)
    assert out["num_samples"].item() == 0 and out["acc"].item() == 0.0


def test_carving_keeps_the_object_and_drops_the_corners():
    from p2n.scenes import render_views, resolve_scene

    cams = ring_rig(8, width=32, height=32)
    views = render_views(resolve_scene("a red sphere"), cams)
    grid = OccupancyGrid(16, FieldConfig().aabb_scale).carve(views)
    assert grid.query(torch.zeros(1, 3)).item()  # the sphere's centre stays
    assert not grid.query(torch.tensor([[1.4, 1.4, 1.4]])).item()  # a far corner is carved away
    assert 0.0 < grid.occupied.float().mean().item() < 0.5


def test_psnr_of_identical_and_known_images():
    a = torch.zeros(2, 4, 4, 3)
    assert psnr(a, a + 0.1).allclose(torch.tensor([20.0, 20.0]), atol=1e-4)
