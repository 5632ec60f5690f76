"""What a refinement pulls a NeRF towards: a prompt, a reference image, or posed views of an object.

A :class:`RefineTarget` carries whatever the chosen guidance and initialization may need — the text prompt (sds,
clip, a generated init), a reference image with its camera (zero123, clip, an image-generated init), posed training
views (multiview) and held-out views (the PSNR curve, whenever ground truth exists). The builders read the four
sources ``p2n refine`` accepts: ``--prompt``, ``--image``, ``--data`` (a transforms.json folder) and ``--scene``
(a procedural caption or id).

Does not own: rendering ground truth (``p2n.scenes``) or reading transforms folders (``p2n.scenes.source``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from p2n.cameras import Cameras, Views
from p2n.config import P2NConfig
from p2n.errors import P2NError
from p2n.nerf.render import composite


class TargetError(P2NError):
    """A refinement target that cannot be built (unreadable image, empty prompt, ...)."""


@dataclass
class RefineTarget:
    name: str  # object id, prompt or image file name: what records and plots call it
    prompt: str | None = None
    ref_image: Tensor | None = None  # [H, W, 3] in [0, 1], composited over render.background
    ref_elevation_deg: float = 0.0  # camera of the reference image (degrees; zero123 conditions on it)
    ref_azimuth_deg: float = 0.0
    ref_radius: float | None = None
    train: Views | None = None  # posed views the multiview guidance fits
    test: Views | None = None  # held-out views: PSNR is measured on these
    split: str | None = None  # procedural objects: "train" or "heldout"

    @property
    def has_ground_truth(self) -> bool:
        return self.test is not None and len(self.test) > 0


def camera_angles(cameras: Cameras) -> tuple[Tensor, Tensor, Tensor]:
    """(elevation°, azimuth°, radius) [N] of cameras looking at the origin (world +Z up, azimuth from +X to +Y)."""
    c = cameras.centers
    r = c.norm(dim=-1)
    el = torch.rad2deg(torch.asin((c[:, 2] / r.clamp(min=1e-9)).clamp(-1, 1)))
    az = torch.rad2deg(torch.atan2(c[:, 1], c[:, 0]))
    return el, az, r


def _with_reference(t: RefineTarget, views: Views, background) -> RefineTarget:
    """Use the first training view (and its camera) as the target's reference image."""
    el, az, r = camera_angles(views.cameras[0])
    t.ref_image = composite(views.images[0], background)
    t.ref_elevation_deg, t.ref_azimuth_deg, t.ref_radius = float(el[0]), float(az[0]), float(r[0])
    return t


def from_prompt(text: str) -> RefineTarget:
    text = (text or "").strip()
    if not text:
        raise TargetError("empty prompt; describe the object, e.g. --prompt 'a red cube'")
    return RefineTarget(name=text, prompt=text)


def from_image(image: str | Path | Tensor, cfg: P2NConfig) -> RefineTarget:
    """A reference image (file, or RGB(A) [H, W, 3|4] in [0, 1]) taken at ``cfg.refine.ref_elevation_deg``."""
    from p2n.scenes.transforms import read_image

    if isinstance(image, Tensor):
        img, name = image.float(), "image"
    else:
        path = Path(image)
        if not path.is_file():
            raise TargetError(f"--image {path}: no such file; give a PNG or JPEG of the object")
        img, name = read_image(path), path.name
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise TargetError(f"reference image must be [H, W, 3] or [H, W, 4], got {tuple(img.shape)}")
    if img.shape[-1] == 4:
        img = composite(img, cfg.render.background)
    return RefineTarget(name=name, ref_image=img.clamp(0, 1), ref_elevation_deg=cfg.refine.ref_elevation_deg,
                        ref_radius=cfg.refine.camera_radius or cfg.scene.camera_radius)


def from_scene(text: str, cfg: P2NConfig) -> RefineTarget:
    """A procedural object (caption or id): rendered training and held-out views, its first caption as prompt."""
    from p2n.scenes.catalogue import resolve_scene
    from p2n.scenes.render import render_object

    spec = resolve_scene(text, cfg.scene)
    train, test = render_object(spec, cfg.scene)
    t = RefineTarget(name=spec.object_id, prompt=spec.captions[0], train=train, test=test, split=spec.split)
    return _with_reference(t, train, cfg.render.background)


def from_folder(path: str | Path, cfg: P2NConfig, normalize: bool = True) -> RefineTarget:
    """A transforms.json folder (see ``p2n.scenes.source.from_folder``); its first caption, if any, is the prompt."""
    from p2n.scenes.source import from_folder as read_folder

    obj = read_folder(path, cfg.scene, normalize)
    t = RefineTarget(name=obj.object_id, prompt=obj.captions[0] if obj.captions else None, train=obj.train,
                     test=obj.test)
    return _with_reference(t, obj.train, cfg.render.background)


def heldout_targets(cfg: P2NConfig, num_objects: int, include_pairs: bool = True,
                    object_ids: list[str] | None = None) -> list[RefineTarget]:
    """The first ``num_objects`` procedural objects whose split is "heldout" under ``cfg.scene`` (or the given
    procedural ``object_ids``), as targets with ground truth."""
    from p2n.scenes.catalogue import catalogue

    if object_ids is None:
        held = [s.object_id for s in catalogue(cfg.scene, include_pairs=include_pairs) if s.split == "heldout"]
        if len(held) < num_objects:
            raise TargetError(f"asked for {num_objects} held-out objects, the catalogue has {len(held)} "
                              f"(scene.heldout_fraction={cfg.scene.heldout_fraction}); ask for fewer")
        object_ids = held[:num_objects]
    return [from_scene(i, cfg) for i in object_ids[:num_objects]]
