"""The PyTorch hash grid against tiny-cuda-nn's documented layout (and tcnn itself where it is importable)."""

import math

import pytest
import torch

from p2n.config import FieldConfig
from p2n.nerf.encoding import HashGrid, grid_levels, hash_grid_torch, num_entries, tcnn_module

U32 = 0xFFFFFFFF


def _tcnn_reference(x, table, n_levels, F, log2_T, base_res, per_level_scale):
    """A literal, scalar transcription of tiny-cuda-nn's grid.h (uint32 maths) for one point."""
    out = []
    offset = 0
    log2_scale = torch.tensor(math.log2(per_level_scale), dtype=torch.float32)
    for level in range(n_levels):
        scale = float(torch.exp2(torch.tensor(float(level)) * log2_scale) * base_res - 1.0)
        res = math.ceil(scale) + 1
        params_in_level = res**3 if res**3 <= (U32 // 2) else U32 // 2
        params_in_level = (params_in_level + 7) // 8 * 8
        params_in_level = min(params_in_level, 1 << log2_T)
        pos, pos_grid = [], []
        for d in range(3):
            p = float(torch.tensor(x[d], dtype=torch.float32) * scale + 0.5)
            pos_grid.append(int(math.floor(p)))
            pos.append(p - math.floor(p))
        feat = [0.0] * F
        for corner in range(8):
            w = 1.0
            g = []
            for d in range(3):
                bit = (corner >> d) & 1
                w *= pos[d] if bit else 1 - pos[d]
                g.append(pos_grid[d] + bit)
            stride, index = 1, 0
            for d in range(3):
                if stride > params_in_level:
                    break
                index = (index + g[d] * stride) & U32
                stride *= res
            if params_in_level < stride:
                primes = (1, 2654435761, 805459861)
                index = 0
                for d in range(3):
                    index ^= (g[d] * primes[d]) & U32
            index %= params_in_level
            for f in range(F):
                feat[f] += w * float(table[(offset + index) * F + f])
        out.extend(feat)
        offset += params_in_level
    return out, offset * F


@pytest.mark.parametrize("log2_T", [10, 14])
def test_torch_encoding_matches_documented_tcnn_layout(log2_T):
    n_levels, F, base, per_level = 6, 2, 8, 1.6
    levels = grid_levels(n_levels, log2_T, base, per_level)
    assert any(lv.hashed for lv in levels) and any(not lv.hashed for lv in levels)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(num_entries(levels) * F, generator=g)
    x = torch.rand(40, 3, generator=g)
    x[0] = torch.tensor([1.0, 1.0, 1.0])  # the wrap-around edge of dense levels
    x[1] = torch.tensor([0.0, 0.5, 1.0])
    ours = hash_grid_torch(x, table, levels, F)
    for i in range(x.shape[0]):
        ref, n_params = _tcnn_reference(x[i].tolist(), table, n_levels, F, log2_T, base, per_level)
        assert n_params == table.numel()
        assert torch.allclose(ours[i], torch.tensor(ref), atol=1e-5), i


def test_param_count_and_level_sizes_follow_tcnn():
    cfg = FieldConfig()
    levels = grid_levels(cfg.num_levels, cfg.log2_hashmap_size, cfg.base_resolution, cfg.per_level_scale)
    assert levels[0].resolution == cfg.base_resolution  # base_resolution counts vertices, as in tcnn
    assert all(lv.size % 8 == 0 and lv.size <= 2**cfg.log2_hashmap_size for lv in levels)
    assert levels[-1].resolution == cfg.max_resolution
    assert [lv.offset for lv in levels][1:] == [a.offset + a.size for a in levels[:-1]]


def test_backward_is_the_transpose_of_forward():
    levels = grid_levels(4, 8, 4, 2.0)
    F = 2
    g = torch.Generator().manual_seed(1)
    table = torch.randn(num_entries(levels) * F, generator=g, requires_grad=True)
    x = torch.rand(64, 3, generator=g)
    out = hash_grid_torch(x, table, levels, F)
    v = torch.randn(out.shape, generator=g)
    (out * v).sum().backward()
    # The encoding is linear in the table, so <v, J t> must equal <J^T v, t>.
    assert torch.allclose((table.grad * table.detach()).sum(), (out.detach() * v).sum(), rtol=1e-4)


@pytest.mark.skipif(tcnn_module() is None or not torch.cuda.is_available(), reason="needs tiny-cuda-nn and CUDA")
def test_tcnn_and_torch_agree_on_the_same_parameters():  # pragma: no cover - GPU only
    cfg = FieldConfig()
    enc = HashGrid(cfg.num_levels, cfg.features_per_level, cfg.log2_hashmap_size, cfg.base_resolution,
                   cfg.per_level_scale, "tcnn")
    table = torch.randn(enc.num_params, device="cuda") * 0.1
    x = torch.rand(1000, 3, device="cuda")
    assert torch.allclose(enc(x, table), hash_grid_torch(x.cpu(), table.cpu(), enc.levels, enc.features).cuda(), atol=1e-4)
