"""The NeRF field: density and colour at a point, evaluated from an *external* flat parameter vector.

Like Shap-E's MetaModule, the field owns no parameters: fitting, the VAE's render loss, generation and refinement
all hand it a vector (one object) and share this single implementation. Layout, in order: the hash table
(tiny-cuda-nn layout, see ``encoding.py``), then a density MLP (enc → hidden → 1 + geo features) and a colour MLP
(geo features → hidden → RGB). Colour is view-independent: p2n's objects are diffuse and it halves the MLP cost.

``init_params(cfg, seed)`` is THE shared initialization of the paper: every object in a dataset starts from the
same vector, which is what makes parameter vectors of different objects live in one aligned space.

Does not own: ray sampling and compositing (``render.py``).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from p2n.config import FieldConfig
from p2n.nerf.encoding import INIT_SCALE, HashGrid
from p2n.nerf.params import ParamLayout


@lru_cache(maxsize=None)
def _encoder_for(cfg: FieldConfig) -> HashGrid:
    return HashGrid(cfg.num_levels, cfg.features_per_level, cfg.log2_hashmap_size, cfg.base_resolution,
                    cfg.per_level_scale, cfg.implementation)


def param_layout(cfg: FieldConfig) -> ParamLayout:
    enc = _encoder_for(cfg)
    h, g, ch = cfg.hidden_dim, cfg.geo_feat_dim, cfg.color_hidden_dim
    return ParamLayout((
        ("encoding.table", (enc.num_params,)),
        ("density.w1", (h, enc.out_dim)), ("density.b1", (h,)),
        ("density.w2", (1 + g, h)), ("density.b2", (1 + g,)),
        ("color.w1", (ch, g)), ("color.b1", (ch,)),
        ("color.w2", (3, ch)), ("color.b2", (3,)),
    ))


def init_params(cfg: FieldConfig, seed: int = 0) -> Tensor:
    """The shared, fixed initialization: identical for identical (cfg, seed), on every machine."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for name, shape in param_layout(cfg).entries:
        n = math.prod(shape)
        if name == "encoding.table":
            bound = INIT_SCALE
        else:  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for weights and biases alike
            fan_in = shape[1] if len(shape) == 2 else _fan_in(cfg, name)
            bound = 1.0 / math.sqrt(fan_in)
        parts.append((torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).float() * bound)
    return torch.cat(parts)


def _fan_in(cfg: FieldConfig, bias_name: str) -> int:
    w = dict(param_layout(cfg).entries)[bias_name.replace(".b", ".w")]
    return w[1]


class _TruncExp(torch.autograd.Function):
    # exp() for density, with the input clamped in the backward pass so one bad sample cannot blow up training.
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.exp(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.exp(x.clamp(-15, 15))


def trunc_exp(x: Tensor) -> Tensor:
    return _TruncExp.apply(x)


class NeRFField:
    """Evaluates density/colour for one field config; cheap to construct, holds no per-object state."""

    def __init__(self, cfg: FieldConfig):
        self.cfg = cfg
        self.encoder = _encoder_for(cfg)
        self.layout = param_layout(cfg)

    @property
    def num_params(self) -> int:
        return self.layout.numel

    def init_params(self, seed: int = 0) -> Tensor:
        return init_params(self.cfg, seed)

    def normalize(self, x: Tensor) -> Tensor:
        """World points in the field's cube → [0, 1]³ (clamped)."""
        s = self.cfg.aabb_scale
        return ((x + s) / (2 * s)).clamp(0.0, 1.0)

    def _geometry(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        enc = self.encoder(self.normalize(x), p["encoding.table"])
        h = F.relu(F.linear(enc, p["density.w1"], p["density.b1"]))
        return F.linear(h, p["density.w2"], p["density.b2"])  # [N, 1 + geo]

    def density(self, x: Tensor, params: Tensor | dict[str, Tensor]) -> Tensor:
        """σ at world points x [N, 3] → [N]."""
        p = params if isinstance(params, dict) else self.layout.unflatten(params)
        return trunc_exp(self._geometry(x, p)[:, 0] - 1.0)

    def __call__(self, x: Tensor, params: Tensor | dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(σ [N], rgb [N, 3]) at world points x [N, 3]."""
        p = params if isinstance(params, dict) else self.layout.unflatten(params)
        geo = self._geometry(x, p)
        # The -1 shift starts every fit from a near-empty field rather than a fog that must first be cleared.
        sigma = trunc_exp(geo[:, 0] - 1.0)
        h = F.relu(F.linear(geo[:, 1:], p["color.w1"], p["color.b1"]))
        rgb = torch.sigmoid(F.linear(h, p["color.w2"], p["color.b2"]))
        return sigma, rgb
