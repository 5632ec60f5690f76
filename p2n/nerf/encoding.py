"""Multi-resolution hash-grid encoding (Instant-NGP) with tiny-cuda-nn's exact parameter layout.

Two implementations share one flat parameter vector, so a NeRF fitted on one runs on the other:

* ``tcnn``  — ``tinycudann.Encoding`` (CUDA), used when importable and the tensors live on a GPU;
* ``torch`` — a pure-PyTorch encoder written for the CPU (separable corner indices, one custom autograd
  function for all levels, int64 ``index_add_`` in the backward pass).

The layout is tiny-cuda-nn's ``HashGrid`` (``grid.h``): level ``l`` has ``scale = 2^(l·log2 b)·N_min − 1`` and
``res = ceil(scale) + 1`` vertices per axis; its table holds ``min(next_multiple(res³, 8), 2^T)`` entries of
``F`` features, levels stored one after another, entry-major (``table[(offset_l + i)·F + f]``). A point
``x ∈ [0,1]³`` sits at ``x·scale + 0.5``; a level whose vertices fit its table indexes them densely
(``x + y·res + z·res²``), otherwise by the coherent prime hash ``x·1 ⊕ y·2654435761 ⊕ z·805459861``; both
modulo the level's entry count. Outputs are level-major: ``[l0f0, l0f1, l1f0, ...]``.

Does not own: the MLPs on top (``field.py``) or where positions come from (``render.py``).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import Tensor

PRIMES = (1, 2654435761, 805459861)
INIT_SCALE = 1e-4  # tiny-cuda-nn initialises hash tables uniformly in [-1e-4, 1e-4]


@dataclass(frozen=True)
class Level:
    scale: float
    resolution: int
    size: int  # table entries
    offset: int  # first entry of this level in the table
    hashed: bool


@lru_cache(maxsize=None)
def grid_levels(num_levels: int, log2_hashmap_size: int, base_resolution: int, per_level_scale: float) -> tuple[Level, ...]:
    """The per-level geometry of a hash grid, computed exactly as tiny-cuda-nn does (float32 maths)."""
    levels, offset = [], 0
    log2_scale = torch.tensor(math.log2(per_level_scale), dtype=torch.float32)
    max_params = (2**32 - 1) // 2
    for i in range(num_levels):
        scale = float(torch.exp2(torch.tensor(float(i), dtype=torch.float32) * log2_scale) * base_resolution - 1.0)
        res = int(math.ceil(scale)) + 1
        dense = max_params if float(res) ** 3 > max_params else res**3
        size = min(-(-dense // 8) * 8, 2**log2_hashmap_size)
        levels.append(Level(scale, res, size, offset, hashed=res**3 > size))
        offset += size
    return tuple(levels)


def num_entries(levels: tuple[Level, ...]) -> int:
    return levels[-1].offset + levels[-1].size


def tcnn_encoding_config(num_levels: int, features_per_level: int, log2_hashmap_size: int, base_resolution: int,
                         per_level_scale: float) -> dict:
    return {
        "otype": "HashGrid",
        "n_levels": num_levels,
        "n_features_per_level": features_per_level,
        "log2_hashmap_size": log2_hashmap_size,
        "base_resolution": base_resolution,
        "per_level_scale": per_level_scale,
        "interpolation": "Linear",
    }


def _corner_indices_and_weights(x: Tensor, levels: tuple[Level, ...]) -> tuple[Tensor, Tensor]:
    """Table rows [N, L, 8] (int64, offsets included) and trilinear weights [N, L, 8] for points x [N, 3]."""
    idx_all, w_all = [], []
    for lv in levels:
        pos = x * lv.scale + 0.5
        grid = torch.floor(pos)
        frac = pos - grid
        g = grid.to(torch.int64)
        g0, g1 = g, g + 1
        # Per-axis index contributions for the two corners; combining them separably costs 6 products, not 24.
        if lv.hashed:
            mask = lv.size - 1  # hashed levels are 2^T entries, so "mod size" of the uint32 hash is a bitmask
            # Bitwise and-with-mask commutes with xor, so each axis can be masked before combining.
            ax = [torch.stack([(g0[:, d] * PRIMES[d]) & mask, (g1[:, d] * PRIMES[d]) & mask], -1) for d in range(3)]
            idx = (ax[0][:, :, None, None] ^ ax[1][:, None, :, None] ^ ax[2][:, None, None, :]) & mask
        else:
            r = lv.resolution
            ax = [torch.stack([g0[:, d], g1[:, d]], -1) * (r**d) for d in range(3)]
            idx = (ax[0][:, :, None, None] + ax[1][:, None, :, None] + ax[2][:, None, None, :]) % lv.size
        wx = [torch.stack([1 - frac[:, d], frac[:, d]], -1) for d in range(3)]
        w = wx[0][:, :, None, None] * wx[1][:, None, :, None] * wx[2][:, None, None, :]
        idx_all.append(idx.reshape(x.shape[0], 8) + lv.offset)
        w_all.append(w.reshape(x.shape[0], 8))
    return torch.stack(idx_all, 1), torch.stack(w_all, 1)


_WIDE = {2: torch.int64, 4: torch.complex128}  # one machine word per table row: a single gather, not F


def _gather(table: Tensor, idx: Tensor, features: int) -> Tensor:
    wide = _WIDE.get(features)
    if wide is not None and table.dtype == torch.float32:
        if not table.is_contiguous() or table.storage_offset() % features:
            table = table.clone()  # a row of a stacked batch can start mid-word; the wide view needs alignment
        return table.view(wide)[idx].view(torch.float32).reshape(*idx.shape, features)
    return table.view(-1, features)[idx]


class _HashGridFunction(torch.autograd.Function):
    """Gather-and-blend forward, scatter-add backward; gradients flow to the table only (not positions)."""

    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, levels: tuple[Level, ...], features: int) -> Tensor:
        idx, w = _corner_indices_and_weights(x.detach(), levels)  # [N, L, 8]
        feats = _gather(table, idx, features)  # [N, L, 8, F]
        out = (feats * w[..., None]).sum(2).reshape(x.shape[0], len(levels) * features)  # [N, L*F]
        ctx.save_for_backward(idx, w)
        ctx.table_shape, ctx.features = table.shape, features
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        idx, w = ctx.saved_tensors
        f = ctx.features
        n, num_levels = idx.shape[0], idx.shape[1]
        g = grad_out.reshape(n, num_levels, 1, f) * w[..., None]  # [N, L, 8, F]
        grad_table = torch.zeros(ctx.table_shape[0] // f, f, dtype=grad_out.dtype, device=grad_out.device)
        grad_table.index_add_(0, idx.reshape(-1), g.reshape(-1, f))
        return None, grad_table.view(-1), None, None


def hash_grid_torch(x: Tensor, table: Tensor, levels: tuple[Level, ...], features: int) -> Tensor:
    """Encode points x [N, 3] in [0, 1] with a flat table [entries·F]; returns [N, L·F]."""
    return _HashGridFunction.apply(x, table, levels, features)


_tcnn = None
_tcnn_warned = False


def tcnn_module():
    """The tinycudann module, or None (warns once) when it is not importable."""
    global _tcnn, _tcnn_warned
    if _tcnn is None:
        try:
            import tinycudann  # type: ignore

            _tcnn = tinycudann
        except Exception as e:  # ImportError, or a build for another CUDA version
            _tcnn = False
            if not _tcnn_warned:
                _tcnn_warned = True
                if torch.cuda.is_available():
                    warnings.warn(f"tiny-cuda-nn is not importable ({e}); using the PyTorch hash grid (same layout, slower)")
    return _tcnn or None


class HashGrid(torch.nn.Module):
    """Hash-grid encoder; holds no parameters itself: the table is passed in, so one module serves many NeRFs."""

    def __init__(self, num_levels: int, features_per_level: int, log2_hashmap_size: int, base_resolution: int,
                 per_level_scale: float, implementation: str = "auto"):
        super().__init__()
        self.levels = grid_levels(num_levels, log2_hashmap_size, base_resolution, per_level_scale)
        self.features = features_per_level
        self.num_params = num_entries(self.levels) * features_per_level
        self.out_dim = num_levels * features_per_level
        self.config = tcnn_encoding_config(num_levels, features_per_level, log2_hashmap_size, base_resolution, per_level_scale)
        if implementation not in ("auto", "tcnn", "torch"):
            raise ValueError(f"unknown hash-grid implementation {implementation!r}; choose auto, tcnn or torch")
        if implementation == "tcnn" and tcnn_module() is None:
            raise RuntimeError("field.implementation=tcnn but tinycudann is not importable; install tiny-cuda-nn "
                               "(needs CUDA) or set field.implementation=auto")
        self.implementation = implementation
        self._tcnn_enc = None

    def uses_tcnn(self, device: torch.device) -> bool:
        return self.implementation != "torch" and device.type == "cuda" and tcnn_module() is not None

    def forward(self, x: Tensor, table: Tensor) -> Tensor:
        if table.numel() != self.num_params:
            raise ValueError(f"hash table has {table.numel()} values, layout needs {self.num_params}")
        if self.uses_tcnn(x.device):
            return self._forward_tcnn(x, table)
        return hash_grid_torch(x, table, self.levels, self.features)

    def _forward_tcnn(self, x: Tensor, table: Tensor) -> Tensor:
        tcnn = tcnn_module()
        if self._tcnn_enc is None:
            self._tcnn_enc = tcnn.Encoding(3, self.config, dtype=torch.float32).to(x.device)
            if self._tcnn_enc.params.numel() != self.num_params:
                raise RuntimeError(f"tiny-cuda-nn reports {self._tcnn_enc.params.numel()} hash-grid parameters, "
                                   f"p2n's layout has {self.num_params}: the layouts diverged")
        out = torch.func.functional_call(self._tcnn_enc, {"params": table}, (x,))
        return out.float()
