"""Fixtures for the dataset tests: a tiny fitting config and a catalogue of transforms.json folders (one of them
corrupt). The moto S3 server and the per-module Ray come from ``tests/conftest.py``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from p2n.config import P2NConfig

# Short fits on small views: ~3-5 s an object on one thread. PSNR is low (~20 dB) and that is fine: the tests
# check that what is stored renders at what was recorded, not fitting quality.
TINY = ["fit.steps=40", "fit.lr=0.03", "fit.rays_per_step=1024", "scene.num_train_views=12", "scene.num_test_views=3",
        "scene.image_size=24", "dataset.include_pairs=false"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_cfg() -> P2NConfig:
    return P2NConfig().override(TINY)


def make_catalogue(root: Path, cfg: P2NConfig, ids: list[str], corrupt: str | None = None) -> Path:
    """One folder per object (Blender layout, via p2n.scenes.export_object); ``corrupt``: the folder name whose
    first training image is truncated."""
    from p2n.scenes import export_object, spec_from_id

    root.mkdir(parents=True, exist_ok=True)
    for i, oid in enumerate(ids):
        name = f"obj{i}"
        export_object(spec_from_id(oid, cfg.scene), cfg.scene, root / name, supersample=1)
        if name == corrupt:
            png = root / name / "train" / "r_0.png"
            png.write_bytes(png.read_bytes()[:40])
    return root


@pytest.fixture(scope="session")
def catalogue_dir(tmp_path_factory, tiny_cfg) -> Path:
    """obj0, obj1: good; obj2: a truncated PNG."""
    ids = ["single/red/cube/s1-p0", "single/blue/sphere/s1-p0", "single/green/cylinder/s1-p0"]
    return make_catalogue(tmp_path_factory.mktemp("catalogue"), tiny_cfg, ids, corrupt="obj2")


def upload(local: Path, uri: str) -> None:
    from p2n.data import storage

    fs, path = storage.url_to_fs(uri)
    fs.put(str(local) + "/", path + "/", recursive=True)


def rendered_psnr(row, cfg: P2NConfig) -> float:
    """PSNR of a row's parameters rendered at its stored views' cameras, against those views."""
    from p2n.data import row_params, row_views
    from p2n.nerf.field import NeRFField
    from p2n.nerf.render import composite, psnr, render_image

    flat, field_cfg = row_params(row, expected_field_cfg=cfg.field)
    views = row_views(row)
    rgb, _ = render_image(NeRFField(field_cfg), flat, views.cameras, cfg.render)
    return float(psnr(rgb, composite(views.images, cfg.render.background)).mean())


@pytest.fixture(scope="session")
def helpers():
    """Plain helper functions shared by the test modules (test modules here are not a package)."""
    return SimpleNamespace(upload=upload, rendered_psnr=rendered_psnr, make_catalogue=make_catalogue)
