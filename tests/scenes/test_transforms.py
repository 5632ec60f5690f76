"""transforms.json: round trip, hand-written Blender and nerfstudio folders, image modes, downscaling, every
malformed input as a DatasetError, and camera normalisation."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from p2n.cameras import Cameras, Views, look_at, random_rig, rays, ring_rig
from p2n.config import SceneConfig
from p2n.scenes import (
    DatasetError,
    export_object,
    normalize_cameras,
    read_image,
    read_transforms,
    render_views,
    resolve_scene,
    write_transforms,
)


def _views(per_camera_intrinsics: bool = False) -> Views:
    cams = ring_rig(3, 4.0, 20.0, 20, 16, 40.0)
    if per_camera_intrinsics:
        cams = Cameras(cams.c2w, cams.fx * torch.tensor([1.0, 1.1, 0.9]), cams.fy, cams.cx + 0.5, cams.cy, 20, 16)
    return render_views(resolve_scene("a red cube on a blue sphere"), cams, supersample=2)


@pytest.mark.parametrize("per_camera", [False, True])
def test_round_trip(tmp_path, per_camera):
    views = _views(per_camera)
    path = write_transforms(views, tmp_path, captions=["a red cube on a blue sphere"], object_id="pair/x")
    doc = json.loads(path.read_text())
    assert ("camera_angle_x" in doc) == (not per_camera) and "fl_x" in (doc if not per_camera else doc["frames"][1])
    back, info = read_transforms(tmp_path)
    for name in ("c2w", "fx", "fy", "cx", "cy"):
        assert torch.allclose(getattr(back.cameras, name), getattr(views.cameras, name), atol=1e-6), name
    assert (back.cameras.width, back.cameras.height) == (20, 16)
    assert (back.images - views.images).abs().max() <= 1 / 255
    assert ((views.images[..., 3] > 0) & (views.images[..., 3] < 1)).any()  # antialiased edges are tested too
    assert info["captions"] == ("a red cube on a blue sphere",) and info["object_id"] == "pair/x"
    assert info["path"] == str(path) and len(info["images"]) == 3


def _blender_folder(root: Path, n: int = 2, size: int = 8, angle: float = 0.6911) -> list[np.ndarray]:
    """A Blender NeRF-synthetic style folder written with PIL and json only (not p2n's writer)."""
    rng = np.random.default_rng(0)
    imgs = []
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        frames = []
        for i in range(n):
            img = rng.integers(0, 256, (size, size, 4), dtype=np.uint8)
            Image.fromarray(img, "RGBA").save(root / split / f"r_{i}.png")
            imgs.append(img)
            c2w = look_at(torch.tensor([[4.0 * math.cos(i), 4.0 * math.sin(i), 1.0 + i]]))[0]
            frames.append({"file_path": f"./{split}/r_{i}", "rotation": 0.0126, "transform_matrix": c2w.tolist()})
        (root / f"transforms_{split}.json").write_text(json.dumps({"camera_angle_x": angle, "frames": frames}))
    return imgs


def test_reads_blender_synthetic_layout(tmp_path):
    imgs = _blender_folder(tmp_path)
    train, info = read_transforms(tmp_path)
    test, _ = read_transforms(tmp_path, split="test")
    assert info["path"].endswith("transforms_train.json") and info["captions"] == () and info["object_id"] is None
    f = 0.5 * 8 / math.tan(0.5 * 0.6911)
    assert torch.allclose(train.cameras.fx, torch.full((2,), f)) and torch.equal(train.cameras.fx, train.cameras.fy)
    assert torch.equal(train.cameras.cx, torch.full((2,), 4.0))
    assert torch.allclose(train.images, torch.from_numpy(np.stack(imgs[:2])).float() / 255)
    assert torch.allclose(test.images, torch.from_numpy(np.stack(imgs[2:])).float() / 255)
    assert torch.allclose(train.cameras.centers[1], torch.tensor([4 * math.cos(1), 4 * math.sin(1), 2.0]))


def test_reads_nerfstudio_layout_with_overrides(tmp_path):
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.fromarray(np.full((6, 10, 3), 200, np.uint8)).save(tmp_path / "images" / f"frame_{i:05d}.jpg")
    c2w = look_at(torch.tensor([[0.0, -3.0, 1.0]]))[0].tolist()
    doc = {"fl_x": 9.0, "fl_y": 8.0, "cx": 5.5, "cy": 2.5, "w": 10, "h": 6, "k1": 0.01, "aabb_scale": 16,
           "camera_model": "OPENCV",
           "frames": [{"file_path": "images/frame_00000.jpg", "transform_matrix": c2w},
                      {"file_path": "images/frame_00001.jpg", "transform_matrix": c2w, "fl_x": 12.0}]}
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    views, info = read_transforms(tmp_path)  # k1: resampled to a pinhole image (a flat one stays flat)
    assert info["undistorted"] == ["perspective"] and views.images[..., :3].sub(200 / 255).abs().max() < 1e-5
    assert views.cameras.fx.tolist() == [9.0, 12.0] and views.cameras.fy.tolist() == [8.0, 8.0]
    assert views.cameras.cx.tolist() == [5.5, 5.5] and views.images[..., 3].eq(1).all()
    with pytest.raises(DatasetError, match="no transforms_test.json"):
        read_transforms(tmp_path, split="test")


def test_image_modes(tmp_path):
    grey16 = np.array([[0, 65535], [32768, 1000]], np.uint16)
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    got = read_image(tmp_path / "g16.png")
    assert torch.allclose(got[..., 0], torch.from_numpy(grey16 / 65535.0).float()) and got[..., 3].eq(1).all()

    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putdata([0, 1])
    pal.info["transparency"] = 1  # palette entry 1 (blue) is fully transparent
    pal.save(tmp_path / "p.png", transparency=1)
    got = read_image(tmp_path / "p.png")
    assert got[0, 0].tolist() == [1.0, 0.0, 0.0, 1.0] and got[0, 1, 3] == 0

    Image.fromarray(np.array([[[10, 255], [200, 0]]], np.uint8).reshape(1, 2, 2), "LA").save(tmp_path / "la.png")
    got = read_image(tmp_path / "la.png")
    assert torch.allclose(got[0, 0], torch.tensor([10, 10, 10, 255]) / 255.0) and got[0, 1, 3] == 0


def test_max_size_filters_premultiplied_colour(tmp_path):
    img = np.zeros((8, 8, 4), np.uint8)
    img[..., 1] = 255  # transparent pixels carry green that must not bleed into the result
    img[0, 0] = (255, 0, 0, 255)  # one opaque red pixel in the top-left 2x2 block
    Image.fromarray(img, "RGBA").save(tmp_path / "r_0.png")
    c2w = look_at(torch.tensor([[0.0, -4.0, 0.0]]))[0].tolist()
    (tmp_path / "transforms.json").write_text(json.dumps(
        {"fl_x": 10.0, "cx": 4.0, "cy": 4.0, "frames": [{"file_path": "r_0.png", "transform_matrix": c2w}]}))
    views, _ = read_transforms(tmp_path, max_size=4)
    assert views.images.shape == (1, 4, 4, 4)
    assert torch.allclose(views.images[0, 0, 0], torch.tensor([1.0, 0.0, 0.0, 0.25]))
    assert views.cameras.fx.item() == 5.0 and views.cameras.cx.item() == 2.0
    # The downscaled camera still sends the pixel-centre ray of the block through the same spot.
    full, _ = read_transforms(tmp_path)
    block = rays(full.cameras)[1][0, 2:4, 2:4].mean(dim=(0, 1))
    assert torch.allclose(rays(views.cameras)[1][0, 1, 1], block / block.norm(), atol=1e-3)


def _valid(root: Path) -> dict:
    (root / "train").mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((4, 4, 4), np.uint8), "RGBA").save(root / "train" / f"r_{i}.png")
    c2w = look_at(torch.tensor([[4.0, 0.0, 0.0]]))[0].tolist()
    return {"camera_angle_x": 0.7,
            "frames": [{"file_path": f"train/r_{i}", "transform_matrix": c2w} for i in range(2)]}


def _break(root: Path, case: str) -> None:
    doc = _valid(root)
    f0 = doc["frames"][0]
    if case == "no json":
        return
    text = None
    if case == "bad json":
        text = '{"frames": [,]}'
    elif case == "no frames":
        del doc["frames"]
    elif case == "empty frames":
        doc["frames"] = []
    elif case == "no matrix":
        del f0["transform_matrix"]
    elif case == "no file_path":
        del f0["file_path"]
    elif case == "3x4 matrix":
        f0["transform_matrix"] = f0["transform_matrix"][:3]
    elif case == "nan matrix":
        f0["transform_matrix"][0][3] = float("nan")
    elif case == "transposed matrix":
        f0["transform_matrix"] = torch.tensor(f0["transform_matrix"]).T.tolist()
    elif case == "no intrinsics":
        del doc["camera_angle_x"]
    elif case == "missing image":
        (root / "train" / "r_1.png").unlink()
    elif case == "corrupt image":
        (root / "train" / "r_1.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    elif case == "size mismatch":
        Image.fromarray(np.zeros((5, 4, 4), np.uint8), "RGBA").save(root / "train" / "r_1.png")
    elif case == "w mismatch":
        doc["w"] = 800
    elif case == "equirectangular":
        doc["camera_model"] = "EQUIRECTANGULAR"
    elif case == "bad coefficient":
        f0["k1"] = "large"
    elif case == "fisheye with tangential":
        doc.update(camera_model="OPENCV_FISHEYE", k1=0.1, p1=0.01)
    (root / "transforms.json").write_text(text if text is not None else json.dumps(doc))


@pytest.mark.parametrize("case, message", [
    ("no json", r"no transforms_train.json or transforms.json in .*; pass the folder"),
    ("bad json", r"transforms.json is not valid JSON \(Expecting value at line 1, column 13\)"),
    ("no frames", r"has no 'frames' list; it needs one entry per image"),
    ("empty frames", r"has an empty 'frames' list"),
    ("no matrix", r"frame 0 has no 'transform_matrix'; add its 4x4 camera-to-world matrix"),
    ("no file_path", r"frame 0 has no 'file_path'"),
    ("3x4 matrix", r"frame 0: 'transform_matrix' has shape \[3, 4\], expected 4x4"),
    ("nan matrix", r"frame 0: 'transform_matrix' contains NaN or infinity"),
    ("transposed matrix", r"frame 0: 'transform_matrix' ends in row .* it may be transposed"),
    ("no intrinsics", r"frame 0: no intrinsics; add 'camera_angle_x' .* or 'fl_x'"),
    ("missing image", r"frame 1: image .*train/r_1 not found .*fix its 'file_path'"),
    ("corrupt image", r"train/r_1.png is not a readable image .*replace it"),
    ("size mismatch", r"train/r_1.png is 4x5 but .*train/r_0.png is 4x4; all frames of one set must share a size"),
    ("w mismatch", r"the json says w=800 but the image is 4x4"),
    ("equirectangular", r"frame 0: camera_model 'EQUIRECTANGULAR' is not a projection p2n can turn into pinhole"),
    ("bad coefficient", r"frame 0: distortion coefficient k1='large' is not a number"),
    ("fisheye with tangential", r"frame 0: a fisheye lens has no tangential terms"),
])
def test_bad_input_raises_dataset_error(tmp_path, case, message):
    _break(tmp_path, case)
    with pytest.raises(DatasetError, match=message):
        read_transforms(tmp_path)


def test_dataset_error_is_a_value_error_and_missing_path_is_named(tmp_path):
    with pytest.raises(ValueError, match="nowhere does not exist"):
        read_transforms(tmp_path / "nowhere")


def test_normalize_cameras_recovers_centre_and_radius():
    cams = ring_rig(8, 4.0, 30.0)
    shift, scale = torch.tensor([2.0, -1.0, 3.0]), 0.25
    c2w = cams.c2w.clone()
    c2w[:, :3, 3] = c2w[:, :3, 3] * scale + shift  # the same rig in other units, somewhere else
    moved = Cameras(c2w, cams.fx, cams.fy, cams.cx, cams.cy, cams.width, cams.height)
    back, transform = normalize_cameras(moved)
    assert torch.allclose(back.c2w, cams.c2w, atol=1e-5)
    homog = torch.cat([moved.centers, torch.ones(8, 1)], dim=1)
    assert torch.allclose((homog @ transform.T)[:, :3], back.centers, atol=1e-5)
    assert torch.allclose(transform[:3, 3], -shift / scale, atol=1e-4)

    blender = random_rig(20, seed=0)
    _, t = normalize_cameras(blender)
    assert torch.allclose(t, torch.eye(4), atol=1e-5)


def test_normalize_cameras_refuses_parallel_axes():
    c2w = look_at(torch.tensor([[0.0, -4.0, 0.0], [1.0, -4.0, 0.0]]), torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))
    with pytest.raises(DatasetError, match="optical axes are \\(nearly\\) parallel"):
        normalize_cameras(Cameras(c2w, 10.0, 10.0, 4.0, 4.0, 8, 8))


def test_export_object(tmp_path):
    cfg = SceneConfig(image_size=12, num_train_views=3, num_test_views=2)
    spec = resolve_scene("a crimson box")
    export_object(spec, cfg, tmp_path)
    train, info = read_transforms(tmp_path)
    test, _ = read_transforms(tmp_path, split="test")
    assert (len(train), len(test)) == (3, 2) and train.images.shape[1:] == (12, 12, 4)
    assert info["object_id"] == spec.object_id and info["captions"] == spec.captions
    assert info["p2n"]["heldout_captions"] == list(spec.heldout_captions)
    assert info["p2n"]["catalogue_split"] == spec.split and info["p2n"]["split"] == "train"
    assert train.images[..., 3].sum() > 0
