"""Posed image sets on disk in the transforms.json format (Blender NeRF-synthetic, nerfstudio, instant-ngp):
reading them into :class:`p2n.cameras.Views`, writing them back, and moving real captures into p2n's frame.

Format, as read here: a json object with ``frames: [{file_path, transform_matrix}, ...]`` (camera-to-world,
OpenGL convention, the same as :mod:`p2n.cameras`) and pinhole intrinsics either as ``camera_angle_x`` (radians;
``camera_angle_y`` optional) or as ``fl_x, fl_y, cx, cy, w, h``, at the top level or per frame (per frame wins).
``file_path`` is relative to the json's folder and may omit the extension (Blender does). An optional ``p2n``
block carries captions and the object id. Lens distortion (``camera_model`` OPENCV / OPENCV_FISHEYE with ``k1..k4,
p1, p2``, or instant-ngp's coefficients with ``is_fisheye``) is removed by resampling each image to the pinhole
camera of the same intrinsics (``undistort.py``); a projection no pinhole image can hold (EQUIRECTANGULAR, ...)
is refused. Other keys (``aabb_scale``, ``applied_transform``, ...) are ignored. A folder with a COLMAP model and
no json reads the same way (``colmap.py`` turns the model into this document).

Every problem with the input raises :class:`DatasetError` saying what is wrong, where, and how to fix it.

Does not own: rays (:mod:`p2n.cameras`) or rendering (:mod:`p2n.scenes.render`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from p2n.cameras import Cameras, Views
from p2n.config import SceneConfig
from p2n.errors import P2NError
from p2n.scenes.catalogue import ObjectSpec
from p2n.scenes.render import render_object
from p2n.scenes.undistort import Lens, undistort
from p2n.viz import to_uint8

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")
_RADIAL_KEYS = ("k1", "k2", "k3", "k4")
_TANGENTIAL_KEYS = ("p1", "p2")
# camera_model values (nerfstudio's, and COLMAP's for the same projections) -> undistort.py's models
_CAMERA_MODELS = {"OPENCV": "perspective", "PERSPECTIVE": "perspective", "SIMPLE_RADIAL": "perspective",
                  "RADIAL": "perspective", "PINHOLE": "perspective", "SIMPLE_PINHOLE": "perspective",
                  "OPENCV_FISHEYE": "fisheye", "FISHEYE": "fisheye", "SIMPLE_RADIAL_FISHEYE": "fisheye",
                  "RADIAL_FISHEYE": "fisheye"}
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # Pillow's modes for 16-bit greyscale PNGs


class DatasetError(P2NError):
    """A posed image set on disk is missing, malformed or inconsistent."""


# ---- reading ---------------------------------------------------------------------------------------------------

def read_transforms(path: str | Path, split: str = "train",
                    max_size: int | None = None) -> tuple[Views, dict[str, Any]]:
    """Load a transforms.json image set as straight-alpha RGBA views.

    ``path``: a json file, or a folder holding ``transforms_{split}.json`` (Blender layout) or, for
    ``split="train"``, a single ``transforms.json`` (nerfstudio / instant-ngp layout).
    ``max_size``: downscale (area filter on premultiplied colour) so that max(H, W) <= max_size.

    Returns the views and a dict with ``path`` (the json), ``images`` (image paths), ``object_id`` and
    ``captions`` from the optional ``p2n`` block (None and () when absent), the raw ``p2n`` block, and
    ``undistorted`` (the lens models whose distortion was resampled away; empty for pinhole captures).
    """
    json_path, root, doc = _find_document(Path(path), split)
    frames = doc.get("frames")
    if not isinstance(frames, list) or not frames:
        raise DatasetError(f"{json_path} has {'an empty' if isinstance(frames, list) else 'no'} 'frames' list; "
                           f"it needs one entry per image with 'file_path' and 'transform_matrix'")
    p2n_block = doc.get("p2n", {})
    if not isinstance(p2n_block, dict):
        raise DatasetError(f"{json_path}: 'p2n' must be an object like {{\"captions\": [...]}}, got {p2n_block!r}")

    images, c2ws, intrinsics, paths = [], [], [], []
    lenses: set[str] = set()
    first: tuple[Path, int, int] | None = None
    target: tuple[int, int] | None = None
    for i, frame in enumerate(frames):
        where = f"{json_path} frame {i}"
        if not isinstance(frame, dict):
            raise DatasetError(f"{where} is {frame!r}; each frame must be an object with 'file_path' and "
                               f"'transform_matrix'")
        c2ws.append(_matrix(frame, where))
        if "file_path" not in frame:
            raise DatasetError(f"{where} has no 'file_path'; add the image's path relative to {root}")
        image_path = _image_path(root, str(frame["file_path"]), where)
        img = read_image(image_path)
        h, w = img.shape[:2]
        if first is None:
            first = (image_path, w, h)
            target = _fit(w, h, max_size)
        elif (w, h) != first[1:]:
            raise DatasetError(f"{image_path} is {w}x{h} but {first[0]} is {first[1]}x{first[2]}; all frames of "
                               f"one set must share a size: resize the images or split them into separate sets")
        intrinsics.append(_intrinsics(doc, frame, w, h, where))
        lens = _lens(doc, frame, where)
        if not lens.is_pinhole:  # at full resolution, where the coefficients were calibrated
            img = undistort(img, *intrinsics[-1], lens)
            lenses.add(lens.model)
        images.append(_downscale(img, *target) if target != (w, h) else img)
        paths.append(str(image_path))

    fx, fy, cx, cy = (torch.tensor(v, dtype=torch.float32) for v in zip(*intrinsics, strict=True))
    cameras = Cameras(torch.stack(c2ws).float(), fx, fy, cx, cy, first[1], first[2])
    if target != (first[1], first[2]):
        cameras = cameras.resized(*target)
    info = {"path": str(json_path), "images": paths, "object_id": p2n_block.get("object_id"),
            "captions": tuple(p2n_block.get("captions", ())), "p2n": p2n_block, "undistorted": sorted(lenses)}
    return Views(torch.stack(images), cameras), info


def read_image(path: Path) -> Tensor:
    """An image file as straight-alpha RGBA float32 [H, W, 4]; greyscale, palette and 16-bit files included.

    Images without alpha get alpha 1. Pillow decodes 16-bit colour PNGs at 8 bits; 16-bit greyscale keeps
    its precision.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in _SIXTEEN_BIT_MODES:
                grey = np.asarray(im, dtype=np.float32) / 65535.0
                rgba = np.stack([grey, grey, grey, np.ones_like(grey)], axis=-1)
            elif im.mode == "F":
                grey = np.asarray(im, dtype=np.float32)
                rgba = np.stack([grey, grey, grey, np.ones_like(grey)], axis=-1)
            else:
                rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(f"{path} is not a readable image ({e}); replace it with a valid PNG or JPEG") from e
    return torch.from_numpy(np.clip(rgba, 0.0, 1.0))


def _find_document(path: Path, split: str) -> tuple[Path, Path, dict]:
    """(where the poses come from, the folder image paths are relative to, the transforms document): a transforms
    json, or for ``split="train"`` a folder's COLMAP model (``colmap.py``) when it has no json."""
    from p2n.scenes import colmap

    try:
        json_path = _find_json(path, split)
    except DatasetError:
        model = colmap.find_model(path) if path.is_dir() and split == "train" else None
        if model is None:
            raise
        try:
            return model, path, colmap.to_transforms(path, model)
        except (colmap.ColmapError, OSError) as e:
            raise DatasetError(str(e)) from None
    return json_path, json_path.parent, _load_json(json_path)


def _find_json(path: Path, split: str) -> Path:
    if path.is_file():
        return path
    if not path.exists():
        raise DatasetError(f"{path} does not exist; pass a folder with transforms.json / transforms_{split}.json "
                           f"or the json file itself")
    names = [f"transforms_{split}.json"] + (["transforms.json"] if split == "train" else [])
    for name in names:
        if (path / name).is_file():
            return path / name
    raise DatasetError(f"no {' or '.join(names)} in {path}; pass the folder that holds it, or the json file "
                       f"itself" + ("" if split == "train" else " (a single transforms.json is read as split='train')")
                       + (" or a COLMAP model (sparse/0/cameras.bin, images.bin) beside images/" if split == "train"
                          else ""))


def _load_json(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                           f"fix the file or re-export it") from e
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path} is not a text JSON file ({e}); point at the transforms json") from e
    if not isinstance(doc, dict):
        raise DatasetError(f"{path} holds a JSON {type(doc).__name__}, not an object with 'frames'")
    return doc


def _matrix(frame: dict, where: str) -> Tensor:
    if "transform_matrix" not in frame:
        raise DatasetError(f"{where} has no 'transform_matrix'; add its 4x4 camera-to-world matrix")
    try:
        m = torch.tensor(frame["transform_matrix"], dtype=torch.float64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{where}: 'transform_matrix' is not a 4x4 list of numbers ({e})") from e
    if m.shape != (4, 4):
        raise DatasetError(f"{where}: 'transform_matrix' has shape {list(m.shape)}, expected 4x4 "
                           f"(camera-to-world, rows of [R | t] then [0, 0, 0, 1])")
    if not torch.isfinite(m).all():
        raise DatasetError(f"{where}: 'transform_matrix' contains NaN or infinity; fix or drop this frame")
    if not torch.allclose(m[3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-6):
        raise DatasetError(f"{where}: 'transform_matrix' ends in row {m[3].tolist()}, not [0, 0, 0, 1]; "
                           f"it may be transposed: write it row by row")
    return m


def _image_path(root: Path, file_path: str, where: str) -> Path:
    p = root / file_path
    if p.is_file():
        return p
    tried = [p.with_name(p.name + s) for s in _IMAGE_SUFFIXES]
    for candidate in tried:
        if candidate.is_file():
            return candidate
    raise DatasetError(f"{where}: image {p} not found (also tried {', '.join(s for s in _IMAGE_SUFFIXES[:3])}); "
                       f"fix its 'file_path' (relative to {root}) or add the image")


def _intrinsics(doc: dict, frame: dict, w: int, h: int, where: str) -> tuple[float, float, float, float]:
    def number(src: dict, key: str) -> float:
        try:
            v = float(src[key])
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: {key}={src[key]!r} is not a number") from None
        if not math.isfinite(v):
            raise DatasetError(f"{where}: {key}={v} is not finite")
        return v

    def lookup(key: str) -> float | None:
        src = frame if key in frame else doc if key in doc else None  # per-frame values override the top level
        return None if src is None else number(src, key)

    def focal(axis: str, size: int) -> float | None:
        for src in (frame, doc):  # a per-frame field of view overrides a top-level focal length too
            if f"fl_{axis}" in src:
                return number(src, f"fl_{axis}")
            if f"camera_angle_{axis}" in src:
                angle = number(src, f"camera_angle_{axis}")
                if not 0 < angle < math.pi:
                    raise DatasetError(f"{where}: camera_angle_{axis}={angle} must be a field of view in radians, "
                                       f"between 0 and pi")
                return 0.5 * size / math.tan(0.5 * angle)
        return None

    for key, size in (("w", w), ("h", h)):
        v = lookup(key)
        if v is not None and v != size:
            raise DatasetError(f"{where}: the json says {key}={v:g} but the image is {w}x{h}; fix 'w'/'h' or use "
                               f"the images the intrinsics were written for")
    fx, fy = focal("x", w), focal("y", h)
    if fx is None and fy is None:
        raise DatasetError(f"{where}: no intrinsics; add 'camera_angle_x' (horizontal field of view in radians) "
                           f"or 'fl_x' (focal length in pixels), at the top level or in the frame")
    fx = fx if fx is not None else fy  # only one focal length given: square pixels
    fy = fy if fy is not None else fx
    if fx <= 0 or fy <= 0:
        raise DatasetError(f"{where}: focal lengths ({fx}, {fy}) must be positive")
    cx, cy = lookup("cx"), lookup("cy")
    return fx, fy, w / 2 if cx is None else cx, h / 2 if cy is None else cy


def _lens(doc: dict, frame: dict, where: str) -> Lens:
    """The frame's lens: ``camera_model`` and coefficients, per frame over the top level (as intrinsics)."""
    def value(key: str, default: Any = None) -> Any:
        return frame[key] if key in frame else doc.get(key, default)

    def coeff(key: str) -> float:
        v = value(key, 0.0)
        try:
            x = float(0.0 if v is None else v)
        except (TypeError, ValueError):
            raise DatasetError(f"{where}: distortion coefficient {key}={v!r} is not a number") from None
        if not math.isfinite(x):
            raise DatasetError(f"{where}: distortion coefficient {key}={x} is not finite")
        return x

    name = value("camera_model")
    if name is None:  # instant-ngp: coefficients only, a flag for fisheye lenses
        model = "fisheye" if value("is_fisheye", False) is True else "perspective"
    else:
        model = _CAMERA_MODELS.get(str(name).upper())
        if model is None:
            raise DatasetError(f"{where}: camera_model {name!r} is not a projection p2n can turn into pinhole "
                               f"rays; it reads {', '.join(sorted(_CAMERA_MODELS))}. Convert the capture to "
                               f"perspective images first (e.g. crop equirectangular panoramas into views)")
    k = tuple(coeff(key) for key in _RADIAL_KEYS)
    p = tuple(coeff(key) for key in _TANGENTIAL_KEYS)
    if model == "fisheye" and any(p):
        raise DatasetError(f"{where}: a fisheye lens has no tangential terms, but p1/p2 = {p}; check camera_model")
    return Lens(model, k, p)  # type: ignore[arg-type]


def _fit(w: int, h: int, max_size: int | None) -> tuple[int, int]:
    if max_size is None or max(w, h) <= max_size:
        return w, h
    if max_size < 1:
        raise DatasetError(f"max_size={max_size} must be a positive number of pixels")
    s = max_size / max(w, h)
    return max(1, round(w * s)), max(1, round(h * s))


def _downscale(img: Tensor, w: int, h: int) -> Tensor:
    """Area-filter straight RGBA [H, W, 4] to w x h. Filtering premultiplied colour keeps transparent pixels'
    (meaningless) colour from bleeding into the object's edge."""
    alpha = img[..., 3:]
    prem = torch.cat([img[..., :3] * alpha, alpha], dim=-1).permute(2, 0, 1)[None]
    prem = F.interpolate(prem, size=(h, w), mode="area")[0].permute(1, 2, 0)
    a = prem[..., 3:]
    return torch.cat([torch.where(a > 0, prem[..., :3] / a.clamp(min=1e-12), 0.0).clamp(0, 1), a], dim=-1)


# ---- camera normalisation --------------------------------------------------------------------------------------

def normalize_cameras(cameras: Cameras, target_radius: float = 4.0) -> tuple[Cameras, Tensor]:
    """Move a capture into p2n's frame: centre it on the point closest (least squares) to every camera's
    optical axis and scale so the mean camera distance to that point is ``target_radius``.

    Returns the moved cameras (rotations and intrinsics unchanged) and the 4x4 similarity ``T`` applied to
    world points (``x_new = T @ x_old``). Blender synthetic rigs (radius 4, looking at the origin) come back
    nearly unchanged. World orientation is kept: the capture's up axis should already be +Z.
    """
    if not target_radius > 0:
        raise ValueError(f"target_radius={target_radius} must be positive")
    c2w = cameras.c2w.double()
    origins = c2w[:, :3, 3]
    axes = -c2w[:, :3, 2]  # cameras look down their local -Z
    axes = axes / axes.norm(dim=-1, keepdim=True)
    # Sum over cameras of the projectors onto each axis's normal plane: minimising the summed squared distance
    # to all axes gives (sum P) x = sum P o.
    proj = torch.eye(3, dtype=torch.float64) - axes[:, :, None] * axes[:, None, :]
    a, b = proj.sum(0), (proj @ origins[..., None]).sum(0)[:, 0]
    eig = torch.linalg.eigvalsh(a)
    if len(cameras) < 2 or eig[0] < 1e-4 * eig[-1]:
        raise DatasetError(f"the {len(cameras)} cameras' optical axes are (nearly) parallel, so they share no "
                           f"centre to normalise around; normalize_cameras needs views from around the object "
                           f"(forward-facing captures are not supported)")
    center = torch.linalg.solve(a, b)
    scale = target_radius / (origins - center).norm(dim=-1).mean()
    transform = torch.eye(4, dtype=torch.float64)
    transform[:3, :3] *= scale
    transform[:3, 3] = -scale * center
    moved = c2w.clone()
    moved[:, :3, 3] = (origins - center) * scale
    return (Cameras(moved.float(), cameras.fx, cameras.fy, cameras.cx, cameras.cy, cameras.width, cameras.height),
            transform.float())


# ---- writing ---------------------------------------------------------------------------------------------------

def write_transforms(views: Views, out_dir: str | Path, captions: tuple[str, ...] | list[str] | None = None,
                     object_id: str | None = None, split: str = "train", filename: str = "transforms.json",
                     metadata: dict[str, Any] | None = None) -> Path:
    """Write ``views`` as RGBA PNGs ``out_dir/{split}/r_{i}.png`` plus ``out_dir/{filename}``; returns the json.

    Intrinsics are written as ``fl_x, fl_y, cx, cy, w, h`` (top level when all cameras share them, else per
    frame), plus ``camera_angle_x`` when fx == fy so Blender-style readers work too. ``captions``,
    ``object_id``, ``split`` and ``metadata`` go into the ``p2n`` block.
    """
    out = Path(out_dir)
    (out / split).mkdir(parents=True, exist_ok=True)
    cams = views.cameras
    w, h = cams.width, cams.height

    def intrinsics(i: int) -> dict[str, float]:
        d = {"fl_x": float(cams.fx[i]), "fl_y": float(cams.fy[i]), "cx": float(cams.cx[i]), "cy": float(cams.cy[i])}
        if d["fl_x"] == d["fl_y"]:
            d["camera_angle_x"] = 2 * math.atan(0.5 * w / d["fl_x"])
        return d

    shared = all(torch.equal(v, v[:1].expand_as(v)) for v in (cams.fx, cams.fy, cams.cx, cams.cy))
    doc: dict[str, Any] = {"w": w, "h": h, **(intrinsics(0) if shared else {})}
    frames = []
    for i in range(len(views)):
        rel = f"{split}/r_{i}.png"
        Image.fromarray(to_uint8(views.images[i]), mode="RGBA").save(out / rel)
        frame = {"file_path": rel, "transform_matrix": cams.c2w[i].tolist()}
        frames.append(frame if shared else {**frame, **intrinsics(i)})
    doc["frames"] = frames
    block: dict[str, Any] = {"split": split}
    if object_id is not None:
        block["object_id"] = object_id
    if captions is not None:
        block["captions"] = list(captions)
    doc["p2n"] = {**block, **(metadata or {})}
    path = out / filename
    path.write_text(json.dumps(doc, indent=2))
    return path


def export_object(spec: ObjectSpec, cfg: SceneConfig | None = None, out_dir: str | Path = ".",
                  supersample: int = 2) -> Path:
    """Render a catalogue object (see :func:`p2n.scenes.render.render_object`) and write its train and test
    views in the Blender layout: ``transforms_train.json``, ``transforms_test.json``, ``train/``, ``test/``."""
    train, test = render_object(spec, cfg, supersample)
    extra = {"heldout_captions": list(spec.heldout_captions), "catalogue_split": spec.split}
    for split, views in (("train", train), ("test", test)):
        write_transforms(views, out_dir, spec.captions, spec.object_id, split, f"transforms_{split}.json", extra)
    return Path(out_dir)
