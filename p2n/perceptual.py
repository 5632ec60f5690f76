"""LPIPS (Zhang et al. 2018; AlexNet trunk, v0.1) in plain PyTorch, from one local weights file. The reference is
github.com/richzhang/PerceptualSimilarity (the ``lpips`` package, BSD-2-Clause); tests compare the two.

The learned part of LPIPS is small (five 1x1 "lin" layers), but it sits on ImageNet-trained AlexNet features,
which nothing here can download. So p2n takes the two together as one file: the ``state_dict()`` of the reference
package's ``lpips.LPIPS(net="alex")``, as ``.safetensors`` or ``.pth``. On a machine with internet:

    python -c "import lpips, torch; torch.save(lpips.LPIPS(net='alex').state_dict(), 'lpips_alex.pth')"

``.pth`` files are read with ``torch.load(weights_only=True)`` (tensors only, no code runs). The forward pass is
the reference one: inputs in [0, 1] mapped to [-1, 1], the v0.1 scaling layer, AlexNet's five ReLU outputs each
unit-normalised over channels, squared differences weighted by the lin layers, averaged over space, summed.

Does not own: which renders are compared (``p2n.evaluate``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from p2n.errors import P2NError

CHANNELS = (64, 192, 384, 256, 256)
# AlexNet's convolutions as (name in the reference state dict, in, out, kernel, stride, padding, max-pool before)
_CONVS = (("net.slice1.0", 3, 64, 11, 4, 2, False), ("net.slice2.3", 64, 192, 5, 1, 2, True),
          ("net.slice3.6", 192, 384, 3, 1, 1, True), ("net.slice4.8", 384, 256, 3, 1, 1, False),
          ("net.slice5.10", 256, 256, 3, 1, 1, False))
_SHIFT = (-0.030, -0.088, -0.188)
_SCALE = (0.458, 0.448, 0.450)


class LPIPSWeightsError(P2NError):
    """An LPIPS weights file that is missing or is not the state dict of ``lpips.LPIPS(net="alex")``."""


class LPIPS(nn.Module):
    """``forward(x, y)``: LPIPS distance per image pair, images ``[B, H, W, 3]`` in [0, 1]; lower is closer."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(i, o, k, s, p) for _, i, o, k, s, p, _ in _CONVS)
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(_SCALE).view(1, 3, 1, 1))
        self.requires_grad_(False)

    def features(self, x: Tensor) -> list[Tensor]:
        h = ((x * 2 - 1) - self.shift) / self.scale
        out = []
        for conv, (*_, pool) in zip(self.convs, _CONVS):
            if pool:
                h = F.max_pool2d(h, 3, 2)
            h = F.relu(conv(h))
            out.append(h / (h.pow(2).sum(1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS compares [B, H, W, 3] image pairs, got {tuple(x.shape)} and {tuple(y.shape)}")
        fx = self.features(x.permute(0, 3, 1, 2).float())
        fy = self.features(y.permute(0, 3, 1, 2).float())
        return sum(lin((a - b).pow(2)).mean((1, 2, 3)) for lin, a, b in zip(self.lins, fx, fy))

    def load_reference_state(self, state: dict[str, Tensor], source: str) -> "LPIPS":
        """Weights from the reference package's state dict (``lin{k}.model.1.weight`` or ``lins.{k}...``)."""
        mine: dict[str, Tensor] = {}
        for k, (name, *_) in enumerate(_CONVS):
            mine[f"convs.{k}.weight"] = _take(state, (f"{name}.weight",), source)
            mine[f"convs.{k}.bias"] = _take(state, (f"{name}.bias",), source)
            mine[f"lins.{k}.weight"] = _take(state, (f"lin{k}.model.1.weight", f"lins.{k}.model.1.weight",
                                                     f"lin{k}.model.0.weight"), source)
        mine["shift"], mine["scale"] = self.shift, self.scale
        try:
            self.load_state_dict(mine)
        except RuntimeError as e:
            raise LPIPSWeightsError(f"{source}: tensor shapes are not LPIPS-AlexNet's ({e})") from None
        return self


def load_lpips(path: str | Path, device: str | torch.device = "cpu") -> LPIPS:
    """An :class:`LPIPS` with the weights in ``path`` (see the module doc for the file)."""
    p = Path(path)
    if not p.is_file():
        raise LPIPSWeightsError(f"LPIPS weights {p} not found; make the file as the p2n.perceptual docstring "
                                f"(README, `p2n eval`) shows, on a machine with internet, and pass its path")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # a corrupt file, or a pickle holding more than tensors
        raise LPIPSWeightsError(f"{p}: not a readable weights file ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise LPIPSWeightsError(f"{p}: holds a {type(state).__name__}, expected a state dict of tensors")
    return LPIPS().load_reference_state(state, str(p)).to(device).eval()


def _take(state: dict[str, Tensor], names: tuple[str, ...], source: str) -> Tensor:
    for n in names:
        if n in state:
            return state[n].float()
    raise LPIPSWeightsError(f"{source}: no {names[0]}; expected the state_dict() of lpips.LPIPS(net='alex') "
                            f"(keys like net.slice1.0.weight and lin0.model.1.weight)")
