"""Lens undistortion: images made through OpenCV's perspective and fisheye models (written out here from the
model equations, independently of p2n's code) must come back as the pinhole image of the same intrinsics; and a
transforms.json with those models reads as that pinhole image."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from p2n.cameras import look_at
from p2n.scenes import read_transforms
from p2n.scenes.undistort import Lens, undistort

W, H, FX, FY, CX, CY = 96, 72, 80.0, 78.0, 49.0, 35.5


def pattern(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A smooth RGB test card over ideal normalised coordinates."""
    return np.stack([0.5 + 0.4 * np.sin(12 * x) * np.cos(10 * y), 0.5 + 0.4 * np.cos(14 * x + 4 * y),
                     0.5 + 0.4 * np.sin(8 * y - 6 * x)], axis=-1)


def lens_forward(x, y, model, k, p):
    k1, k2, k3, k4 = k
    if model == "fisheye":
        r = np.hypot(x, y)
        th = np.arctan(r)
        thd = th * (1 + k1 * th**2 + k2 * th**4 + k3 * th**6 + k4 * th**8)
        s = np.where(r > 0, thd / np.maximum(r, 1e-12), 1.0)
        return x * s, y * s
    p1, p2 = p
    r2 = x * x + y * y
    rad = 1 + k1 * r2 + k2 * r2**2 + k3 * r2**3 + k4 * r2**4
    return x * rad + 2 * p1 * x * y + p2 * (r2 + 2 * x * x), y * rad + p1 * (r2 + 2 * y * y) + 2 * p2 * x * y


def lens_inverse(xd, yd, model, k, p):
    """Ideal coordinates whose image is (xd, yd): Newton's method on the forward model, numerical Jacobian."""
    x, y = xd.copy(), yd.copy()
    for _ in range(50):
        fx, fy = lens_forward(x, y, model, k, p)
        e = 1e-6
        ax, ay = lens_forward(x + e, y, model, k, p)
        bx, by = lens_forward(x, y + e, model, k, p)
        j11, j21, j12, j22 = (ax - fx) / e, (ay - fy) / e, (bx - fx) / e, (by - fy) / e
        det = j11 * j22 - j12 * j21
        rx, ry = fx - xd, fy - yd
        x, y = x - (j22 * rx - j12 * ry) / det, y - (j11 * ry - j21 * rx) / det
    return x, y


def captured(model, k, p) -> tuple[np.ndarray, np.ndarray]:
    """(the image through the lens, the pinhole image) of the test card, RGBA float."""
    v, u = np.meshgrid(np.arange(H) + 0.5, np.arange(W) + 0.5, indexing="ij")
    xd, yd = (u - CX) / FX, (v - CY) / FY
    x, y = lens_inverse(xd, yd, model, k, p)
    alpha = np.ones((H, W, 1))
    return np.concatenate([pattern(x, y), alpha], -1), np.concatenate([pattern(xd, yd), alpha], -1)


def psnr(a, b) -> float:
    return float(-10 * np.log10(np.mean((a - b) ** 2)))


CASES = [("perspective", (-0.25, 0.06, 0.0, 0.0), (0.004, -0.003)),  # barrel, a phone's wide camera
         ("perspective", (0.2, 0.0, 0.0, 0.0), (0.0, 0.0)),  # pincushion
         ("fisheye", (0.05, -0.02, 0.004, 0.0), (0.0, 0.0))]


@pytest.mark.parametrize("model, k, p", CASES)
def test_undistort_recovers_the_pinhole_image(model, k, p):
    through_lens, pinhole = captured(model, k, p)
    out = undistort(torch.from_numpy(through_lens).float(), FX, FY, CX, CY, Lens(model, k, p)).numpy()
    # Border pixels of pincushion / fisheye output can map outside the frame (clamped); judge the interior.
    inner = (slice(4, H - 4), slice(4, W - 4))
    assert psnr(out[inner][..., :3], pinhole[inner][..., :3]) > 45  # bilinear resampling error only (~60 dB)
    assert psnr(through_lens[inner][..., :3], pinhole[inner][..., :3]) < 30  # the distortion was really there
    np.testing.assert_allclose(out[..., 3], 1.0, atol=1e-6)


def test_a_pinhole_lens_returns_the_image_untouched():
    img = torch.rand(8, 10, 4)
    assert undistort(img, 5.0, 5.0, 5.0, 4.0, Lens("perspective")) is img
    assert not Lens("fisheye").is_pinhole  # equidistant even with zero coefficients


@pytest.mark.parametrize("layout", ["nerfstudio", "instant-ngp"])
@pytest.mark.parametrize("model, k, p", CASES[::2])
def test_a_distorted_capture_reads_as_its_pinhole_views(tmp_path, layout, model, k, p):
    through_lens, pinhole = captured(model, k, p)
    (tmp_path / "images").mkdir()
    Image.fromarray((through_lens[..., :3] * 255).round().astype(np.uint8)).save(tmp_path / "images" / "a.png")
    coeffs = dict(zip(("k1", "k2", "k3", "k4", "p1", "p2"), (*k, *p)))
    doc = {"fl_x": FX, "fl_y": FY, "cx": CX, "cy": CY, "w": W, "h": H, **coeffs,
           "frames": [{"file_path": "images/a.png",
                       "transform_matrix": look_at(torch.tensor([[0.0, -3.0, 1.0]]))[0].tolist()}]}
    if layout == "nerfstudio":
        doc["camera_model"] = "OPENCV_FISHEYE" if model == "fisheye" else "OPENCV"
    elif model == "fisheye":
        doc["is_fisheye"] = True
    (tmp_path / "transforms.json").write_text(json.dumps(doc))
    views, info = read_transforms(tmp_path)
    assert info["undistorted"] == [model]
    got = views.images[0].numpy()
    inner = (slice(4, H - 4), slice(4, W - 4))
    assert psnr(got[inner][..., :3], pinhole[inner][..., :3]) > 35  # 8-bit quantisation on top
    assert math.isclose(float(views.cameras.fx[0]), FX)  # intrinsics unchanged: a pinhole with the same K
