"""`p2n fit` end to end: a procedural scene, a Blender-style folder written without p2n, and bad input."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from p2n.cameras import ring_rig
from p2n.scenes import render_views, resolve_scene

FAST = ["--set", "scene.image_size=32", "--set", "scene.num_train_views=16", "--set", "scene.num_test_views=4",
        "--set", "fit.rays_per_step=2048", "--no-progress", "--threads", "1"]


def p2n(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "p2n.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_fit_scene_writes_params_pictures_and_json(tmp_path):
    r = p2n("fit", "--scene", "a yellow torus", "--out", str(tmp_path), "--steps", "80", *FAST)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert {"psnr_test", "seconds", "steps", "num_params"} <= set(rec)
    assert rec["steps"] <= 80 and rec["psnr_test"] > 20
    for name in ("params.safetensors", "views.png", "turntable.gif", "metrics.json", "config.yaml"):
        assert (tmp_path / name).stat().st_size > 0
    assert Image.open(tmp_path / "turntable.gif").n_frames == 24


def _blender_folder(root, n=12, size=40):
    """A NeRF-synthetic style folder written with PIL and json only: camera_angle_x, no file extensions."""
    cams = ring_rig(n, radius=4.0, elevation_deg=30.0, width=size, height=size, fov_deg=40.0)
    views = render_views(resolve_scene("a purple capsule"), cams)
    frames = []
    (root / "train").mkdir(parents=True)
    for i in range(n):
        rgba = (views.images[i].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(rgba, "RGBA").save(root / "train" / f"r_{i}.png")
        frames.append({"file_path": f"./train/r_{i}", "rotation": 0.1, "transform_matrix": cams.c2w[i].tolist()})
    doc = {"camera_angle_x": 2 * math.atan(0.5 * size / float(cams.fx[0])), "frames": frames}
    (root / "transforms_train.json").write_text(json.dumps(doc))
    return root


def test_fit_data_folder_written_by_another_tool(tmp_path):
    data = _blender_folder(tmp_path / "capture")
    r = p2n("fit", "--data", str(data), "--out", str(tmp_path / "out"), "--steps", "60", *FAST)
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    assert rec["psnr_test"] > 18 and rec["object_id"] == "capture"


@pytest.mark.parametrize("case", ["missing", "bad_json", "wrong_keys", "corrupt_image", "mixed_sizes"])
def test_bad_data_folders_get_one_clear_line(tmp_path, case):
    root = tmp_path / "d"
    if case != "missing":
        _blender_folder(root, n=4, size=16)
        doc = json.loads((root / "transforms_train.json").read_text())
        if case == "bad_json":
            (root / "transforms_train.json").write_text("{not json")
        elif case == "wrong_keys":
            doc["frames"] = [{"path": f["file_path"], "matrix": f["transform_matrix"]} for f in doc["frames"]]
            (root / "transforms_train.json").write_text(json.dumps(doc))
        elif case == "corrupt_image":
            (root / "train" / "r_1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        elif case == "mixed_sizes":
            Image.new("RGBA", (20, 16)).save(root / "train" / "r_2.png")
    r = p2n("fit", "--data", str(root), "--out", str(tmp_path / "o"), "--steps", "5", *FAST)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and r.stderr.startswith("p2n fit: error:")


def test_unknown_scene_words_list_the_known_ones(tmp_path):
    r = p2n("fit", "--scene", "a plaid dodecahedron", "--out", str(tmp_path), *FAST)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "dodecahedron" in r.stderr and "known shapes" in r.stderr
