"""Pictures people look at: image grids (PNG), animations (GIF, MP4 where ffmpeg is available), loss curves.

Does not own: rendering (``p2n.nerf.render``); this module only turns float images into files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor


def to_uint8(img: Tensor | np.ndarray) -> np.ndarray:
    a = img.detach().cpu().numpy() if isinstance(img, Tensor) else np.asarray(img)
    return (np.clip(a, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def image_grid(rows: Sequence[Sequence[Tensor]], labels: Sequence[str] | None = None, pad: int = 2,
               scale: int = 1) -> Image.Image:
    """Tile rows of RGB images [H, W, 3] (floats in [0, 1]) into one picture, optionally with row labels."""
    h, w = rows[0][0].shape[:2]
    h, w = h * scale, w * scale
    label_w = 0 if not labels else 8 + 7 * max(len(s) for s in labels)
    ncol = max(len(r) for r in rows)
    canvas = Image.new("RGB", (label_w + ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), (40, 40, 40))
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        y = pad + r * (h + pad)
        if labels:
            draw.text((4, y + h // 2 - 5), labels[r], fill=(230, 230, 230))
        for c, img in enumerate(row):
            tile = Image.fromarray(to_uint8(img[..., :3]))
            if scale != 1:
                tile = tile.resize((w, h), Image.NEAREST)
            canvas.paste(tile, (label_w + pad + c * (w + pad), y))
    return canvas


def save_png(img: Image.Image | Tensor, path: str | Path) -> None:
    if isinstance(img, Tensor):
        img = Image.fromarray(to_uint8(img))
    img.save(path)


def save_animation(frames: Sequence[Tensor] | Tensor, path: str | Path, fps: int = 12) -> Path:
    """Write frames [H, W, 3] as a looping GIF (or MP4 when the path says so and ffmpeg is installed)."""
    path = Path(path)
    arr = [to_uint8(f[..., :3]) for f in frames]
    if path.suffix == ".mp4":
        import imageio.v2 as imageio

        with imageio.get_writer(path, fps=fps, macro_block_size=1) as wr:
            for a in arr:
                wr.append_data(a)
        return path
    imgs = [Image.fromarray(a) for a in arr]
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=int(1000 / fps), loop=0)
    return path


def plot_curves(curves: dict[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, xlabel: str = "step",
                ylabel: str = "", title: str = "", size: tuple[int, int] = (640, 400)) -> None:
    """A dependency-free line plot (PIL): ``curves`` maps a label to (xs, ys)."""
    palette = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
    W, H = size
    m_l, m_r, m_t, m_b = 60, 20, 30, 40
    img = Image.new("RGB", size, (255, 255, 255))
    d = ImageDraw.Draw(img)
    xs = [x for v in curves.values() for x in v[0]]
    ys = [y for v in curves.values() for y in v[1] if np.isfinite(y)]
    if not xs or not ys:
        img.save(path)
        return
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = min(ys), max(ys) if max(ys) > min(ys) else min(ys) + 1

    def px(x, y):
        return m_l + (x - x0) / (x1 - x0) * (W - m_l - m_r), H - m_b - (y - y0) / (y1 - y0) * (H - m_t - m_b)

    d.rectangle([m_l, m_t, W - m_r, H - m_b], outline=(0, 0, 0))
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        _, yy = px(x0, yv)
        d.text((4, yy - 5), f"{yv:.3g}", fill=(0, 0, 0))
        xv = x0 + (x1 - x0) * k / 4
        xx, _ = px(xv, y0)
        d.text((xx - 10, H - m_b + 5), f"{xv:.3g}", fill=(0, 0, 0))
    d.text((W // 2 - 20, H - 18), xlabel, fill=(0, 0, 0))
    d.text((m_l, 8), f"{title}  {ylabel}".strip(), fill=(0, 0, 0))
    for i, (label, (cx, cy)) in enumerate(curves.items()):
        col = palette[i % len(palette)]
        pts = [px(x, y) for x, y in zip(cx, cy) if np.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=col, width=2)
        d.text((W - m_r - 150, m_t + 6 + 14 * i), label, fill=col)
    img.save(path)



