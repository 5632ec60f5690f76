"""Meshes and turntables from a fitted NeRF: the mesh loads in trimesh with the object's size and colour."""

import pytest
import torch

from p2n.config import P2NConfig
from p2n.errors import P2NError
from p2n.export import extract_mesh, save_mesh, turntable_frames
from p2n.nerf.field import init_params
from p2n.nerf.fit import fit
from p2n.scenes.source import from_scene


@pytest.fixture(scope="module")
def red_cube():
    cfg = P2NConfig().override(["scene.image_size=32", "scene.num_train_views=16", "fit.steps=100"])
    obj = from_scene("a red cube", cfg.scene)
    return cfg, fit(obj.train, cfg).params


def test_mesh_has_the_cube_bounds_and_colour(red_cube, tmp_path):
    import trimesh

    cfg, params = red_cube
    ply, glb = save_mesh(params, cfg, tmp_path / "mesh", resolution=64)
    mesh = trimesh.load(ply)
    lo, hi = mesh.bounds
    # The procedural cube is about 1.1 units across, centred at the origin.
    assert (hi - lo).min() > 0.8 and (hi - lo).max() < 1.6
    assert abs((hi + lo) / 2).max() < 0.2
    rgb = mesh.visual.vertex_colors[:, :3].astype(float).mean(0)
    assert rgb[0] > 100 and rgb[1] < 60 and rgb[2] < 60
    assert len(trimesh.load(glb).geometry) == 1


def test_an_empty_field_has_no_mesh():
    cfg = P2NConfig()
    with pytest.raises(P2NError, match="no surface"):
        extract_mesh(init_params(cfg.field) * 0 - 5, cfg, resolution=16)


def test_turntable_frames_show_the_object_from_every_side(red_cube):
    cfg, params = red_cube
    frames = turntable_frames(params, cfg, num_frames=6, size=24)
    assert frames.shape == (6, 24, 24, 3)
    centre = frames[:, 10:14, 10:14]
    assert (centre[..., 0] > centre[..., 2] + 0.2).all()  # red in the middle of every frame
    assert (frames[:, 0, 0] > 0.9).all()  # white background in the corners
