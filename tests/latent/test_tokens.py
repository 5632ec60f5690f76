"""Per-layer / per-level tokenization of flat NeRF parameter vectors, and the VAE's size at a million parameters."""

import math

import pytest
import torch

from p2n.config import FieldConfig, VAEConfig
from p2n.latent import ParamTokenizer, ParamVAE, segments
from p2n.nerf.field import param_layout


@pytest.mark.parametrize("chunk", [1024, 300])
def test_tokens_round_trip_exactly(chunk):
    cfg = FieldConfig()
    tok = ParamTokenizer(cfg, chunk)
    x = torch.randn(3, tok.num_params)
    t = tok.tokens(x)
    assert t.shape == (3, tok.num_tokens, chunk)
    assert torch.equal(tok.flat(t), x)
    assert tok.num_tokens == sum(math.ceil(s.size / chunk) for s in segments(cfg))
    assert float(t[:, ~tok.mask].abs().sum()) == 0.0  # padding slots hold zeros


def test_segments_are_layers_and_levels_and_tokens_never_mix_them():
    cfg = FieldConfig()
    segs = segments(cfg)
    names = [s.name for s in segs]
    assert names[:cfg.num_levels] == [f"encoding.level{i}" for i in range(cfg.num_levels)]
    assert names[cfg.num_levels:] == ["density.1", "density.2", "color.1", "color.2"]  # weight + bias per layer
    assert sum(s.size for s in segs) == param_layout(cfg).numel
    tok = ParamTokenizer(cfg, 1000)
    seg_of = torch.empty(tok.num_params, dtype=torch.long)
    for i, s in enumerate(segs):
        seg_of[s.start:s.start + s.size] = i
    for k in range(tok.num_tokens):
        idx = tok.gather_index[k][tok.mask[k]]
        assert len(set(seg_of[idx].tolist())) == 1, f"token {k} ({tok.token_names[k]}) spans two segments"


def test_vae_size_is_linear_in_the_parameter_count_at_a_million_parameters():
    field = FieldConfig(log2_hashmap_size=17)  # ~1.05 M parameters
    p = param_layout(field).numel
    assert p > 1_000_000
    cfg = VAEConfig(latent_dim=16, chunk_size=8192, head_dim=2, model_dim=32, depth=1, heads=2)
    torch.manual_seed(0)
    vae = ParamVAE(cfg, field)
    k = vae.tokenizer.num_tokens
    grouped = sum(m.weight.numel() + m.bias.numel() for m in (vae.enc_in, vae.dec_out))
    assert grouped == k * (cfg.chunk_size * cfg.head_dim + cfg.head_dim) + k * (cfg.head_dim * cfg.chunk_size
                                                                                 + cfg.chunk_size)
    rest = sum(q.numel() for q in vae.parameters()) - grouped
    assert rest < 0.05 * p  # nothing else grows with P: no dense P x hidden layer
    out = vae(torch.randn(2, p), eps=torch.randn(2, cfg.latent_dim))
    assert out["recon"].shape == (2, p) and out["mu"].shape == (2, cfg.latent_dim)
