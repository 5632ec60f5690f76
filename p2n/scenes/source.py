"""Where an object's views come from, for every command that fits or evaluates one: a procedural id or caption,
or a folder in the transforms.json format (a real capture or another tool's renders).

Does not own: parsing either source (``catalogue.py``, ``transforms.py``) — only choosing and splitting.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from p2n.cameras import Views
from p2n.config import SceneConfig
from p2n.scenes.catalogue import resolve_scene
from p2n.scenes.render import render_object
from p2n.scenes.transforms import DatasetError, normalize_cameras, read_transforms


@dataclass
class ObjectViews:
    object_id: str
    captions: tuple[str, ...]
    train: Views
    test: Views


def from_scene(text: str, cfg: SceneConfig) -> ObjectViews:
    spec = resolve_scene(text, cfg)
    train, test = render_object(spec, cfg)
    return ObjectViews(spec.object_id, spec.captions, train, test)


def from_folder(path: str | Path, cfg: SceneConfig, normalize: bool = True) -> ObjectViews:
    """Train views from ``transforms[_train].json``; test views from ``transforms_test.json`` when present,
    otherwise every 8th training frame is held out (and not trained on)."""
    path = Path(path)
    train, meta = read_transforms(path, "train", max_size=cfg.image_size)
    test = None
    if path.is_dir() and (path / "transforms_test.json").is_file():
        test, _ = read_transforms(path, "test", max_size=cfg.image_size)
        if (test.cameras.width, test.cameras.height) != (train.cameras.width, train.cameras.height):
            raise DatasetError(f"{path}: test images are {test.cameras.width}x{test.cameras.height}, training "
                               f"images {train.cameras.width}x{train.cameras.height}; use one image size")
    if test is None:
        if len(train) < 2:
            raise DatasetError(f"{path}: needs at least 2 frames (one is held out for testing), found {len(train)}")
        held = list(range(0, len(train), 8))
        kept = [i for i in range(len(train)) if i not in held]
        train, test = train[kept], train[held]
    if normalize:
        # One transform for both splits, estimated from the training cameras.
        cams, world = normalize_cameras(train.cameras, cfg.camera_radius)
        train = Views(train.images, cams)
        test = Views(test.images, _apply(test, world))
    object_id = meta.get("object_id") or path.resolve().name
    return ObjectViews(object_id, tuple(meta.get("captions") or ()), train, test)


def _apply(views: Views, world):
    from p2n.cameras import Cameras

    c2w = world @ views.cameras.c2w
    # A similarity transform scales the rotation part too; re-normalise so c2w stays rigid.
    scale = c2w[:, :3, :3].norm(dim=1, keepdim=True)
    c2w[:, :3, :3] = c2w[:, :3, :3] / scale
    c = views.cameras
    return Cameras(c2w, c.fx, c.fy, c.cx, c.cy, c.width, c.height)
