"""COLMAP sparse models as captures: a folder with ``images/`` and a COLMAP model (``sparse/0/``, ``sparse/`` or the
folder itself; ``cameras`` and ``images`` as ``.bin`` or ``.txt``) reads like a transforms.json folder.

:func:`to_transforms` turns the model into the transforms.json document ``transforms.py`` reads: per-frame
intrinsics, COLMAP's camera model and coefficients (so its lens distortion is resampled away like any other),
and camera-to-world matrices in the OpenGL convention (COLMAP stores world-to-camera rotations as quaternions
``qw qx qy qz`` and translations, with x right, y down, z forward). An optional ``p2n.json`` beside ``images/``
gives captions and the object id, as the ``p2n`` block of a transforms.json does.

Camera models read: SIMPLE_PINHOLE, PINHOLE, SIMPLE_RADIAL, RADIAL, OPENCV, OPENCV_FISHEYE, SIMPLE_RADIAL_FISHEYE,
RADIAL_FISHEYE. Others (FULL_OPENCV's rational model, FOV, THIN_PRISM_FISHEYE) are refused with the list.
Only the cameras and images files are read; 3D points are not needed.

Does not own: images, intrinsics checks, undistortion (``transforms.py``, ``undistort.py``).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np

# COLMAP's model ids -> (name, parameter names in COLMAP's order)
MODELS: dict[int, tuple[str, tuple[str, ...]]] = {
    0: ("SIMPLE_PINHOLE", ("f", "cx", "cy")),
    1: ("PINHOLE", ("fx", "fy", "cx", "cy")),
    2: ("SIMPLE_RADIAL", ("f", "cx", "cy", "k1")),
    3: ("RADIAL", ("f", "cx", "cy", "k1", "k2")),
    4: ("OPENCV", ("fx", "fy", "cx", "cy", "k1", "k2", "p1", "p2")),
    5: ("OPENCV_FISHEYE", ("fx", "fy", "cx", "cy", "k1", "k2", "k3", "k4")),
    8: ("SIMPLE_RADIAL_FISHEYE", ("f", "cx", "cy", "k1")),
    9: ("RADIAL_FISHEYE", ("f", "cx", "cy", "k1", "k2")),
}
_UNSUPPORTED = {6: "FULL_OPENCV", 7: "FOV", 10: "THIN_PRISM_FISHEYE"}
_BY_NAME = {name: (i, params) for i, (name, params) in MODELS.items()}
MODEL_DIRS = ("sparse/0", "sparse", "colmap/sparse/0", ".")


class ColmapError(ValueError):
    """A COLMAP model that cannot be read; ``transforms.py`` turns it into its DatasetError."""


def find_model(folder: Path) -> Path | None:
    """The folder holding ``cameras.{bin,txt}`` and ``images.{bin,txt}``, or None when ``folder`` has no model."""
    for sub in MODEL_DIRS:
        d = folder / sub
        if all((d / f"{n}.bin").is_file() or (d / f"{n}.txt").is_file() for n in ("cameras", "images")):
            return d
    return None


def to_transforms(folder: Path, model_dir: Path) -> dict[str, Any]:
    """The COLMAP model in ``model_dir`` as a transforms.json document whose paths are relative to ``folder``."""
    cameras = _read_cameras(model_dir)
    frames = []
    for name, q, t, cam_id in sorted(_read_images(model_dir), key=lambda im: im[0]):
        if cam_id not in cameras:
            raise ColmapError(f"{model_dir}: image {name} uses camera {cam_id}, which cameras.* does not define")
        model, w, h, params = cameras[cam_id]
        image = next((p for p in (f"images/{name}", name) if (folder / p).is_file()), f"images/{name}")
        frames.append({"file_path": image, "transform_matrix": _c2w_opengl(q, t).tolist(),
                       "w": w, "h": h, "camera_model": model, **_intrinsics(model, params)})
    if not frames:
        raise ColmapError(f"{model_dir}: the model has no registered images")
    doc: dict[str, Any] = {"frames": frames}
    meta = folder / "p2n.json"
    if meta.is_file():
        try:
            doc["p2n"] = json.loads(meta.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ColmapError(f"{meta} is not valid JSON ({e}); it should look like {{\"captions\": [...]}}") from None
    return doc


def _intrinsics(model: str, params: list[float]) -> dict[str, float]:
    names = _BY_NAME[model][1]
    v = dict(zip(names, params))
    if "f" in v:
        v["fx"] = v["fy"] = v.pop("f")
    return {"fl_x": v.pop("fx"), "fl_y": v.pop("fy"), "cx": v.pop("cx"), "cy": v.pop("cy"), **v}


def _c2w_opengl(q: tuple[float, ...], t: tuple[float, ...]) -> np.ndarray:
    qw, qx, qy, qz = q
    n = math.sqrt(qw * qw + qx * qx + qy * qy + qz * qz)
    if not n > 0:
        raise ColmapError(f"quaternion {q} has zero length")
    qw, qx, qy, qz = qw / n, qx / n, qy / n, qz / n
    r = np.array([[1 - 2 * (qy * qy + qz * qz), 2 * (qx * qy - qw * qz), 2 * (qx * qz + qw * qy)],
                  [2 * (qx * qy + qw * qz), 1 - 2 * (qx * qx + qz * qz), 2 * (qy * qz - qw * qx)],
                  [2 * (qx * qz - qw * qy), 2 * (qy * qz + qw * qx), 1 - 2 * (qx * qx + qy * qy)]])
    c2w = np.eye(4)
    c2w[:3, :3] = r.T
    c2w[:3, 3] = -r.T @ np.asarray(t, dtype=np.float64)
    return c2w @ np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV camera axes (y down, z forward) -> OpenGL


def _model_name(model: str | int, where: str) -> str:
    if isinstance(model, int):
        if model in _UNSUPPORTED:
            model = _UNSUPPORTED[model]
        elif model not in MODELS:
            raise ColmapError(f"{where}: unknown COLMAP camera model id {model}")
        else:
            return MODELS[model][0]
    if model not in _BY_NAME:
        raise ColmapError(f"{where}: COLMAP camera model {model} is not supported; p2n reads "
                          f"{', '.join(_BY_NAME)} (undistort the images with `colmap image_undistorter` first)")
    return model


def _read_cameras(d: Path) -> dict[int, tuple[str, int, int, list[float]]]:
    out: dict[int, tuple[str, int, int, list[float]]] = {}
    if (d / "cameras.bin").is_file():
        data = (d / "cameras.bin").read_bytes()
        try:
            (n,), off = struct.unpack_from("<Q", data, 0), 8
            for _ in range(n):
                cam_id, model_id, w, h = struct.unpack_from("<iiQQ", data, off)
                off += 24
                name = _model_name(model_id, f"{d}/cameras.bin camera {cam_id}")
                k = len(_BY_NAME[name][1])
                params = list(struct.unpack_from(f"<{k}d", data, off))
                off += 8 * k
                out[cam_id] = (name, int(w), int(h), params)
        except struct.error as e:
            raise ColmapError(f"{d}/cameras.bin is truncated or not a COLMAP cameras file ({e})") from None
        return out
    for i, line in enumerate((d / "cameras.txt").read_text().splitlines()):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        where = f"{d}/cameras.txt line {i + 1}"
        try:
            cam_id, w, h = int(parts[0]), int(parts[2]), int(parts[3])
            name = _model_name(parts[1], where)
            params = [float(x) for x in parts[4:]]
        except (IndexError, ValueError) as e:
            raise ColmapError(f"{where}: expected 'CAMERA_ID MODEL WIDTH HEIGHT PARAMS...' ({e})") from None
        if len(params) != len(_BY_NAME[name][1]):
            raise ColmapError(f"{where}: {name} takes {len(_BY_NAME[name][1])} parameters "
                              f"({' '.join(_BY_NAME[name][1])}), got {len(params)}")
        out[cam_id] = (name, w, h, params)
    return out


def _read_images(d: Path) -> list[tuple[str, tuple[float, ...], tuple[float, ...], int]]:
    out = []
    if (d / "images.bin").is_file():
        data = (d / "images.bin").read_bytes()
        try:
            (n,), off = struct.unpack_from("<Q", data, 0), 8
            for _ in range(n):
                vals = struct.unpack_from("<i7di", data, off)
                off += 64
                end = data.index(b"\0", off)
                name = data[off:end].decode("utf-8")
                off = end + 1
                (npts,) = struct.unpack_from("<Q", data, off)
                off += 8 + 24 * npts  # (x, y, point3D_id) per observation: not needed
                out.append((name, vals[1:5], vals[5:8], vals[8]))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ColmapError(f"{d}/images.bin is truncated or not a COLMAP images file ({e})") from None
        return out
    lines = [ln for ln in (d / "images.txt").read_text().splitlines() if not ln.startswith("#")]
    # Two lines per image: the pose line, then its 2D observations (possibly empty).
    for i in range(0, len(lines), 2):
        if not lines[i].strip():
            continue
        parts = lines[i].split()
        try:
            q = tuple(float(x) for x in parts[1:5])
            t = tuple(float(x) for x in parts[5:8])
            out.append((" ".join(parts[9:]), q, t, int(parts[8])))
        except (IndexError, ValueError) as e:
            raise ColmapError(f"{d}/images.txt: expected 'IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME', got "
                              f"{lines[i][:80]!r} ({e})") from None
    return out
