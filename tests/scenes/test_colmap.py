"""COLMAP sparse models as captures: a model written here from known cameras (text and binary, with an independent
writer and scipy's rotation maths) must read back as the same cameras and images; COLMAP's lens models go through
undistortion; unsupported models and broken files are clear errors; a catalogue accepts COLMAP folders."""

import json
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.transform import Rotation

from p2n.cameras import Cameras, ring_rig
from p2n.data.build import catalogue_sources
from p2n.scenes import DatasetError, read_transforms, render_views, resolve_scene

MODEL_IDS = {"SIMPLE_PINHOLE": 0, "PINHOLE": 1, "SIMPLE_RADIAL": 2, "OPENCV": 4, "FULL_OPENCV": 6}


def views():
    cams = ring_rig(4, 4.0, 25.0, 20, 16, 40.0)
    cams = Cameras(cams.c2w, cams.fx * torch.tensor([1.0, 1.0, 1.1, 1.1]), cams.fy * torch.tensor([1.0, 1.0, 1.1, 1.1]),
                   cams.cx, cams.cy, 20, 16)
    return render_views(resolve_scene("a red cube"), cams, supersample=2)


def write_colmap(root, v, fmt="txt", model="PINHOLE", extra=(), sub="sparse/0"):
    """COLMAP's world-to-camera (OpenCV axes) from p2n's camera-to-world (OpenGL axes); two cameras (intrinsics
    shared by frames 0-1 and 2-3)."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    d = root / sub
    d.mkdir(parents=True, exist_ok=True)
    cams, images = {}, []
    for i in range(len(v)):
        rgba = (v.images[i].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(rgba[..., :3]).save(root / "images" / f"frame {i:02d}.png")  # a space in the name
        c2w = v.cameras.c2w[i].double().numpy() @ np.diag([1.0, -1.0, -1.0, 1.0])
        w2c = np.linalg.inv(c2w)
        x, y, z, w = (float(c) for c in Rotation.from_matrix(w2c[:3, :3]).as_quat())
        cam_id = 1 + i // 2
        fx, fy = float(v.cameras.fx[i]), float(v.cameras.fy[i])
        cx, cy = float(v.cameras.cx[i]), float(v.cameras.cy[i])
        params = {"SIMPLE_PINHOLE": [fx, cx, cy], "PINHOLE": [fx, fy, cx, cy], "SIMPLE_RADIAL": [fx, cx, cy, *extra],
                  "OPENCV": [fx, fy, cx, cy, *extra], "FULL_OPENCV": [fx, fy, cx, cy] + [0.0] * 8}[model]
        cams[cam_id] = params
        images.append((i + 1, (w, x, y, z), tuple(float(c) for c in w2c[:3, 3]), cam_id, f"frame {i:02d}.png"))
    W, H = v.cameras.width, v.cameras.height
    if fmt == "txt":
        (d / "cameras.txt").write_text("# Camera list\n" + "".join(
            f"{k} {model} {W} {H} {' '.join(repr(p) for p in ps)}\n" for k, ps in cams.items()))
        (d / "images.txt").write_text("# Image list with two lines of data per image\n" + "".join(
            f"{i} {' '.join(repr(c) for c in q)} {' '.join(repr(c) for c in t)} {c} {n}\n1.0 2.0 -1\n"
            for i, q, t, c, n in images))
    else:
        data = struct.pack("<Q", len(cams))
        for k, ps in cams.items():
            data += struct.pack("<iiQQ", k, MODEL_IDS[model], W, H) + struct.pack(f"<{len(ps)}d", *ps)
        (d / "cameras.bin").write_bytes(data)
        data = struct.pack("<Q", len(images))
        for i, q, t, c, n in images:
            data += struct.pack("<i7di", i, *q, *t, c) + n.encode() + b"\0"
            data += struct.pack("<Q", 2) + struct.pack("<ddq", 1.0, 2.0, -1) * 2
        (d / "images.bin").write_bytes(data)


@pytest.mark.parametrize("fmt, model, sub", [("txt", "PINHOLE", "sparse/0"), ("bin", "PINHOLE", "sparse"),
                                             ("bin", "SIMPLE_PINHOLE", "."), ("txt", "SIMPLE_PINHOLE", "sparse/0")])
def test_a_colmap_model_reads_as_its_cameras_and_images(tmp_path, fmt, model, sub):
    v = views()
    if model == "SIMPLE_PINHOLE":  # one focal length: make fy = fx
        v.cameras.fy.copy_(v.cameras.fx)
    write_colmap(tmp_path, v, fmt, model, sub=sub)
    (tmp_path / "p2n.json").write_text(json.dumps({"captions": ["a red cube"], "object_id": "cube-1"}))
    got, info = read_transforms(tmp_path)
    assert len(got) == 4 and info["captions"] == ("a red cube",) and info["object_id"] == "cube-1"
    assert info["undistorted"] == []
    torch.testing.assert_close(got.cameras.c2w.float(), v.cameras.c2w.float(), atol=1e-5, rtol=0)
    for k in ("fx", "fy", "cx", "cy"):
        torch.testing.assert_close(getattr(got.cameras, k).float(), getattr(v.cameras, k).float())
    assert (got.cameras.width, got.cameras.height) == (20, 16)
    assert (got.images[..., :3] - v.images[..., :3]).abs().max() <= 0.5 / 255 + 1e-6


def test_colmap_distortion_is_resampled_and_unsupported_models_refused(tmp_path):
    v = views()
    write_colmap(tmp_path / "radial", v, "bin", "SIMPLE_RADIAL", extra=(0.8,))  # strong: the images are small
    got, info = read_transforms(tmp_path / "radial")
    assert info["undistorted"] == ["perspective"]
    assert float((got.images[..., :3] - v.images[..., :3]).abs().max()) > 0.05  # the images were resampled
    write_colmap(tmp_path / "opencv", v, "txt", "OPENCV", extra=(0.0, 0.0, 0.0, 0.0))
    assert read_transforms(tmp_path / "opencv")[1]["undistorted"] == []  # zero coefficients: a pinhole
    write_colmap(tmp_path / "full", v, "bin", "FULL_OPENCV")
    with pytest.raises(DatasetError, match="FULL_OPENCV is not supported; p2n reads .*image_undistorter"):
        read_transforms(tmp_path / "full")


def test_broken_colmap_files_are_clear_errors(tmp_path):
    v = views()
    write_colmap(tmp_path, v, "bin")
    (tmp_path / "sparse/0/images.bin").write_bytes((tmp_path / "sparse/0/images.bin").read_bytes()[:50])
    with pytest.raises(DatasetError, match="images.bin is truncated or not a COLMAP images file"):
        read_transforms(tmp_path)
    write_colmap(tmp_path / "t", v, "txt")
    (tmp_path / "t/sparse/0/cameras.txt").write_text("1 PINHOLE 20 16 30.0\n")
    with pytest.raises(DatasetError, match=r"PINHOLE takes 4 parameters \(fx fy cx cy\), got 1"):
        read_transforms(tmp_path / "t")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="or a COLMAP model"):
        read_transforms(tmp_path / "empty")


def test_a_catalogue_takes_colmap_folders(tmp_path):
    v = views()
    write_colmap(tmp_path / "cat" / "obj-a", v, "bin")
    (tmp_path / "cat" / "obj-a" / "p2n.json").write_text(json.dumps({"object_id": "red-cube", "captions": ["x"]}))
    write_colmap(tmp_path / "cat" / "obj-b", v, "txt")
    sources = catalogue_sources(str(tmp_path / "cat"))
    assert sorted(s.object_id for s in sources) == ["obj-b", "red-cube"]
