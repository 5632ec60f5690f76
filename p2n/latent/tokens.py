"""Cutting a flat NeRF parameter vector into tokens, per layer and per hash-grid level, and putting it back.

A segment is one layer of an MLP (its weight and bias together) or one level of the hash table (that level's
entries x features); each segment is cut into the fewest tokens of at most ``chunk_size`` values, of near-equal
length, and the last values of each token are zero padding. So a token never mixes two layers or two levels, and
the same coordinate always lands in the same token slot: tokens have a fixed meaning across objects, which is what
lets the VAE give each token its own linear encoder and decoder.

``ParamTokenizer.tokens(x)`` maps ``[B, P]`` to ``[B, K, C]`` and ``.flat(t)`` maps back; both are one gather.

Does not own: what the parameters mean (``p2n.nerf``) or the model over the tokens (``vae.py``).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from p2n.config import FieldConfig
from p2n.nerf.encoding import grid_levels
from p2n.nerf.field import param_layout

_LAYER = re.compile(r"^(.*)\.[wb](\d+)$")  # density.w1 / density.b1 -> one layer "density.1"


@dataclass(frozen=True)
class Segment:
    name: str  # "encoding.level3", "density.1", ...
    start: int  # offset in the flat vector
    size: int


def segments(cfg: FieldConfig) -> list[Segment]:
    """The per-level / per-layer segments of a field's flat parameter vector, in order, covering it exactly."""
    out: list[Segment] = []
    offsets = param_layout(cfg).offsets()
    for name, (a, b) in offsets.items():
        if name == "encoding.table":
            levels = grid_levels(cfg.num_levels, cfg.log2_hashmap_size, cfg.base_resolution, cfg.per_level_scale)
            f = cfg.features_per_level
            for i, lv in enumerate(levels):
                out.append(Segment(f"encoding.level{i}", a + lv.offset * f, lv.size * f))
            continue
        m = _LAYER.match(name)
        key = f"{m.group(1)}.{m.group(2)}" if m else name
        if out and out[-1].name == key and out[-1].start + out[-1].size == a:
            out[-1] = Segment(key, out[-1].start, out[-1].size + (b - a))
        else:
            out.append(Segment(key, a, b - a))
    total = sum(s.size for s in out)
    if total != param_layout(cfg).numel:  # the table's level sizes must add up to the layout's entry
        raise AssertionError(f"segments cover {total} values, the layout has {param_layout(cfg).numel}")
    return out


class ParamTokenizer:
    """``[B, P]`` <-> ``[B, K, C]`` for one field layout and chunk size ``C``."""

    def __init__(self, cfg: FieldConfig, chunk_size: int):
        if chunk_size < 1:
            raise ValueError(f"vae.chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = c = int(chunk_size)
        self.num_params = param_layout(cfg).numel
        gather: list[Tensor] = []  # per token: flat indices, padded with num_params (a zero column)
        names: list[str] = []
        for seg in segments(cfg):
            n_tok = math.ceil(seg.size / c)
            per = math.ceil(seg.size / n_tok)
            for k in range(n_tok):
                lo, hi = seg.start + k * per, min(seg.start + (k + 1) * per, seg.start + seg.size)
                idx = torch.full((c,), self.num_params, dtype=torch.long)
                idx[: hi - lo] = torch.arange(lo, hi)
                gather.append(idx)
                names.append(seg.name)
        self.gather_index = torch.stack(gather)  # [K, C]
        self.token_names = names
        flat_pos = self.gather_index.reshape(-1)
        real = flat_pos < self.num_params
        self.scatter_index = torch.empty(self.num_params, dtype=torch.long)  # [P]: position in the K*C grid
        self.scatter_index[flat_pos[real]] = torch.nonzero(real)[:, 0]
        self.mask = real.reshape(self.gather_index.shape)  # [K, C] True where a token slot holds a value

    @property
    def num_tokens(self) -> int:
        return self.gather_index.shape[0]

    def tokens(self, x: Tensor) -> Tensor:
        """Flat vectors ``[B, P]`` -> tokens ``[B, K, C]`` (padding slots are 0)."""
        if x.shape[-1] != self.num_params:
            raise ValueError(f"expected [B, {self.num_params}] parameter vectors, got {tuple(x.shape)}")
        padded = torch.cat([x, x.new_zeros(*x.shape[:-1], 1)], -1)
        return padded[..., self.gather_index.to(x.device)]

    def flat(self, t: Tensor) -> Tensor:
        """Tokens ``[B, K, C]`` -> flat vectors ``[B, P]`` (padding slots are dropped)."""
        return t.reshape(*t.shape[:-2], -1)[..., self.scatter_index.to(t.device)]
