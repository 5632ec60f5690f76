"""The analytic renderer against closed forms: silhouette areas, Lambertian colours, occlusion, antialiasing."""

import math
import time

import pytest
import torch

from p2n.cameras import Cameras, look_at, rays, ring_rig
from p2n.config import SceneConfig
from p2n.scenes import ObjectSpec, Primitive, render_object, render_views, resolve_scene
from p2n.scenes.render import AMBIENT, DIFFUSE, LIGHT_DIR
from p2n.scenes.vocab import SHAPE_WORDS

RED, BLUE = (0.9, 0.1, 0.1), (0.1, 0.2, 0.9)


def _spec(*prims: Primitive) -> ObjectSpec:
    return ObjectSpec("test", prims, (), (), "train")


def _cams(eyes, size=64, fov=40.0) -> Cameras:
    f = 0.5 * size / math.tan(math.radians(fov / 2))
    return Cameras(look_at(torch.tensor(eyes, dtype=torch.float32)), f, f, size / 2, size / 2, size, size)


def test_sphere_silhouette_area_matches_closed_form():
    r, dist = 0.8, 4.0
    cams = ring_rig(3, dist, 20.0, 64, 64, 40.0)
    spec = _spec(Primitive("sphere", "red", RED, r))
    f = float(cams.fx[0])
    # A sphere seen from its centre's direction projects to a disc of radius f * r / sqrt(d^2 - r^2).
    expected = math.pi * f**2 * r**2 / (dist**2 - r**2)
    hard = render_views(spec, cams).images[..., 3]
    assert set(hard.unique().tolist()) == {0.0, 1.0}
    assert (hard.sum(dim=(1, 2)) / expected - 1).abs().max() < 0.03
    soft = render_views(spec, cams, supersample=4).images[..., 3]
    assert (soft.sum(dim=(1, 2)) / expected - 1).abs().max() < 0.01
    edge = (soft > 0) & (soft < 1)
    assert edge.sum() > 50 and hard[soft == 1].eq(1).all() and hard[soft == 0].eq(0).all()


def test_sphere_colours_match_lambert_at_every_pixel():
    r, center = 0.7, torch.tensor([0.1, -0.2, 0.15])
    cams = _cams([[4.0, 1.0, 1.5], [-2.0, 3.0, -1.0]], size=48)
    views = render_views(_spec(Primitive("sphere", "blue", BLUE, r, tuple(center.tolist()))), cams)
    o, d = rays(cams)
    # Closed-form ray / sphere intersection.
    oc = o - center
    b = (oc * d).sum(-1)
    disc = b**2 - ((oc * oc).sum(-1) - r**2)
    hit = disc > 0
    t = -b - disc.clamp(min=0).sqrt()
    n = (o + t[..., None] * d - center) / r
    shade = AMBIENT + DIFFUSE * (n @ torch.tensor(LIGHT_DIR)).clamp(min=0)
    expected = torch.tensor(BLUE) * shade[..., None]
    alpha = views.images[..., 3]
    assert (alpha.bool() != hit).sum() <= 2  # at most a grazing pixel or two may differ
    both = hit & alpha.bool() & (disc > 0.01)
    assert (views.images[..., :3][both] - expected[both]).abs().max() < 1e-3
    assert views.images[..., :3][~alpha.bool()].eq(0).all()  # background is transparent black


def test_flat_face_facing_up_has_closed_form_colour():
    cams = _cams([[0.0, 0.0, 4.0]], size=32)  # straight above a cube: the centre pixel sees its top face
    img = render_views(_spec(Primitive("cube", "red", RED, 0.8)), cams).images[0]
    expected = torch.tensor(RED) * (AMBIENT + DIFFUSE * LIGHT_DIR[2])
    assert torch.allclose(img[16, 16, :3], expected, atol=1e-4)
    assert torch.isfinite(img).all()


def test_nearest_primitive_wins():
    spec = _spec(Primitive("sphere", "red", RED, 0.25, (0.6, 0.0, 0.0)),
                 Primitive("sphere", "blue", BLUE, 0.65, (-0.3, 0.0, 0.0)))
    front, back = render_views(spec, _cams([[4.0, 0.0, 0.0], [-4.0, 0.0, 0.0]], size=32)).images
    # From +x the small red sphere hides the centre of the big blue one; its rim still shows blue.
    def is_red(px):
        return px[3] == 1 and px[0] > 2 * px[2]

    def is_blue(px):
        return px[3] == 1 and px[2] > 2 * px[0]

    assert is_red(front[16, 16]) and is_blue(back[16, 16])
    # Discs of radius 3.2 px (red) and 6.7 px (blue): 4.5 px off centre only blue shows.
    assert is_blue(front[16, 11]) and is_blue(front[16, 20])


def test_every_shape_renders_centred_and_finite():
    cams = ring_rig(4, 4.0, 25.0, 32, 32, 40.0)
    for shape in SHAPE_WORDS:
        img = render_views(resolve_scene(f"a red {shape}"), cams, supersample=2).images
        alpha = img[..., 3]
        assert torch.isfinite(img).all() and 0.03 < alpha.mean() < 0.5, shape
        ys, xs = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
        cx = (alpha * xs).sum(dim=(1, 2)) / alpha.sum(dim=(1, 2))
        assert (cx - 15.5).abs().max() < 2.5, shape  # centred horizontally in every view


def test_render_is_fast():
    spec = resolve_scene("a red cube on a blue sphere")
    cams = ring_rig(8, 4.0, 25.0, 64, 64, 40.0)
    render_views(spec, cams)  # warm-up
    start = time.perf_counter()
    render_views(spec, cams)
    assert time.perf_counter() - start < 1.0


def test_render_object_rigs():
    cfg = SceneConfig(image_size=16, num_train_views=5, num_test_views=3)
    spec = resolve_scene("a green cone next to a yellow torus")
    train, test = render_object(spec, cfg, supersample=1)
    assert train.images.shape == (5, 16, 16, 4) and test.images.shape == (3, 16, 16, 4)
    again, _ = render_object(spec, cfg, supersample=1)
    assert torch.equal(train.images, again.images) and torch.equal(train.cameras.c2w, again.cameras.c2w)
    other, _ = render_object(resolve_scene("a red cube"), cfg, supersample=1)
    assert not torch.allclose(other.cameras.c2w, train.cameras.c2w)  # each object gets its own viewpoints
    elevation = torch.rad2deg(torch.asin(test.cameras.centers[:, 2] / cfg.camera_radius))
    assert torch.allclose(elevation, torch.full((3,), 30.0), atol=1e-3)
    assert torch.allclose(train.cameras.centers.norm(dim=-1), torch.full((5,), cfg.camera_radius))


def test_supersample_must_be_positive():
    with pytest.raises(ValueError, match="supersample=0"):
        render_views(resolve_scene("a red cube"), ring_rig(1), supersample=0)
