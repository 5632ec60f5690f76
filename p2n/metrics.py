"""Image-quality metrics used by evaluation and benchmarks: PSNR (re-exported) and SSIM.

Does not own: LPIPS/CLIP scores, which need model weights and live with the evaluation command.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from p2n.nerf.render import psnr

__all__ = ["psnr", "ssim"]


def _gaussian(size: int = 11, sigma: float = 1.5) -> Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(a: Tensor, b: Tensor, window: int = 11) -> Tensor:
    """SSIM (Wang et al. 2004, Gaussian window σ=1.5) of RGB images [..., H, W, 3] in [0, 1]; one value per image."""
    lead = a.shape[:-3]
    x = a.reshape(-1, *a.shape[-3:]).permute(0, 3, 1, 2)
    y = b.reshape(-1, *b.shape[-3:]).permute(0, 3, 1, 2)
    window = min(window, x.shape[-1], x.shape[-2])
    g = _gaussian(window)
    k = (g[:, None] * g[None, :]).expand(3, 1, window, window).to(x)

    def blur(t: Tensor) -> Tensor:
        return F.conv2d(t, k, groups=3)

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    sxx, syy, sxy = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.mean(dim=(1, 2, 3)).reshape(lead)
