"""Stage 1: the VAE's file round trip, kind checks, interpolation, and what a trained one reconstructs."""

from dataclasses import replace

import pytest
import torch

from p2n.config import FieldConfig, VAEConfig
from p2n.data import open_dataset, row_params, row_views
from p2n.latent import CheckpointError, VAEModel, WrongCheckpointKind, decode, encode, interpolate, load_vae
from p2n.nerf.field import NeRFField, param_layout
from p2n.nerf.params import ParamsError, save_params
from p2n.nerf.render import composite, psnr, render_image


def small_vae(seed=0) -> VAEModel:
    field = FieldConfig(num_levels=2, log2_hashmap_size=8, base_resolution=4, max_resolution=8, hidden_dim=8,
                        geo_feat_dim=3, color_hidden_dim=8)
    torch.manual_seed(seed)
    p = param_layout(field).numel
    return VAEModel(VAEConfig(latent_dim=8, chunk_size=128, head_dim=4, model_dim=16, depth=1, heads=2), field,
                    torch.randn(p), torch.rand(p) + 0.5).eval()


def test_checkpoint_round_trip_reproduces_outputs_exactly(tmp_path):
    vae = small_vae()
    x = torch.randn(3, vae.num_params)
    with torch.no_grad():
        z, params = vae.encode(x), vae.decode(torch.randn(3, vae.latent_dim))
    path = vae.save(str(tmp_path))
    assert path.endswith("vae.safetensors")
    loaded = load_vae(str(tmp_path))
    with torch.no_grad():
        assert torch.equal(encode(loaded, x), z)
        assert torch.equal(decode(loaded, z), decode(vae, z))
        assert torch.equal(loaded.decode(z[0]), vae.decode(z[0]))  # unbatched too
    assert torch.equal(loaded.mean, vae.mean) and torch.equal(loaded.std, vae.std)
    assert loaded.fingerprint() == vae.fingerprint() != small_vae(seed=1).fingerprint()
    assert (loaded.latent_dim, loaded.layout_hash) == (8, vae.field.layout_hash())
    assert params.shape == (3, vae.num_params)


@pytest.mark.parametrize("chunk_size", [128, 100, 7])
def test_inference_decode_equals_the_autograd_decode(chunk_size):
    """The no-grad decode assembles parameters with a copy plan instead of a gather; every layer boundary, partial
    last token and multi-token run must land where the gather puts it (chunk sizes that do and do not divide the
    layer sizes)."""
    vae = small_vae()
    vae = VAEModel(replace(vae.cfg, chunk_size=chunk_size), vae.field, vae.mean, vae.std).eval()
    torch.manual_seed(1)
    for p in vae.net.dec_out.parameters():  # non-trivial bias too, so a misplaced slot shows
        torch.nn.init.normal_(p)
    z = torch.randn(5, vae.latent_dim)
    with torch.enable_grad():
        slow = vae.decode(z).detach()
    with torch.no_grad():
        fast = vae.decode(z)
    assert fast.shape == slow.shape == (5, vae.num_params)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    with torch.enable_grad():  # the normalised output of the training path is untouched
        x = vae.net.decode(z)
    torch.testing.assert_close(x.detach() * vae.std + vae.mean, slow, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("chunk_size", [128, 7])
def test_a_frozen_vae_decodes_the_same_parameters_and_saves_the_same_file(chunk_size, tmp_path):
    """freeze() folds the per-coordinate std/mean into the output layer: its decode must equal the autograd
    decode with non-trivial statistics, grad mode on or off; z that needs a gradient still gets one through the
    real weights; nothing folded reaches the file; training again drops the folded copy."""
    base = small_vae()
    torch.manual_seed(2)
    mean, std = torch.randn(base.num_params), torch.rand(base.num_params) * 3 + 0.01
    vae = VAEModel(replace(base.cfg, chunk_size=chunk_size), base.field, mean, std).eval()
    for p in vae.net.dec_out.parameters():
        torch.nn.init.normal_(p)
    z = torch.randn(4, vae.latent_dim)
    with torch.enable_grad():
        slow = vae.decode(z).detach()
    before = vae.fingerprint()
    vae.freeze()
    assert vae.folded_weight is not None and not any(p.requires_grad for p in vae.parameters())
    with torch.no_grad():
        torch.testing.assert_close(vae.decode(z), slow, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(vae.decode(z), slow, rtol=1e-5, atol=1e-4)  # grad mode on, nothing needs one
    zg = z.clone().requires_grad_(True)
    out = vae.decode(zg)
    out.sum().backward()
    assert zg.grad is not None and float(zg.grad.abs().sum()) > 0
    torch.testing.assert_close(out.detach(), slow, rtol=1e-5, atol=1e-4)
    assert vae.fingerprint() == before and not any("folded" in k for k in vae.state_dict())
    vae.save(str(tmp_path))
    torch.testing.assert_close(load_vae(str(tmp_path)).decode(z), slow, rtol=1e-5, atol=1e-4)
    vae.train()
    assert vae.folded_weight is None
    vae.eval().freeze().set_stats(torch.zeros_like(mean), torch.ones_like(std))
    assert vae.folded_weight is None  # new statistics: the folded layer would be stale


def test_loading_the_wrong_kind_of_file_is_a_clear_error(tmp_path):
    vae = small_vae()
    nerf = tmp_path / "params.safetensors"
    save_params(nerf, torch.zeros(vae.num_params), vae.field)
    with pytest.raises(WrongCheckpointKind, match="NeRF parameters"):
        load_vae(str(nerf))
    from p2n.align import Aligner, load_aligner, save_aligner
    from p2n.config import AlignConfig

    vae.save(str(tmp_path))
    align = save_aligner(str(tmp_path), Aligner(AlignConfig(depth=1), {"text": 16}, 8), torch.zeros(8),
                         torch.ones(8), vae)
    with pytest.raises(WrongCheckpointKind, match="an aligner"):
        load_vae(align)
    with pytest.raises(WrongCheckpointKind, match="a VAE"):
        load_aligner(str(tmp_path / "vae.safetensors"), with_encoders=False)
    with pytest.raises(CheckpointError, match="no model file"):
        load_vae(str(tmp_path / "missing"))
    assert issubclass(WrongCheckpointKind, ValueError)  # a P2NError


def test_interpolate_is_batched_and_hits_both_ends():
    z0, z1 = torch.randn(4, 8), torch.randn(4, 8)
    t = torch.linspace(0, 1, 5)
    path = interpolate(z0, z1, t)
    assert path.shape == (4, 5, 8)
    assert torch.allclose(path[:, 0], z0) and torch.allclose(path[:, -1], z1)
    assert torch.allclose(interpolate(z0, z1, 0.25), 0.75 * z0 + 0.25 * z1)
    u = torch.nn.functional.normalize(z0, dim=-1) * 3
    v = torch.nn.functional.normalize(z1, dim=-1) * 3
    assert torch.allclose(interpolate(u, v, t, mode="slerp").norm(dim=-1), torch.full((4, 5), 3.0), atol=1e-4)
    with pytest.raises(ValueError, match="linear"):
        interpolate(z0, z1, t, mode="cubic")


def _objects(dataset, split="train"):
    ds = open_dataset(str(dataset))
    return [(r["object_id"], row_params(r)[0], row_views(r)) for r in ds.rows(split=split)], ds.config


def _psnr(field, params, views, cfg) -> float:
    rgb, _ = render_image(NeRFField(field), params.clone(), views.cameras, cfg.render)
    return float(psnr(rgb, composite(views.images, cfg.render.background)).mean())


def test_decoded_training_objects_render_within_2db_of_their_fitted_params(tiny_dataset, tiny_vae_dir):
    vae = load_vae(str(tiny_vae_dir))
    objs, cfg = _objects(tiny_dataset)
    assert len(objs) == 9  # tiny_dataset's training split
    with torch.no_grad():
        decoded = vae.reconstruct(torch.stack([p for _, p, _ in objs]))
    gaps = []
    for (oid, params, views), dec in zip(objs, decoded):
        fitted, ours = _psnr(vae.field, params, views, cfg), _psnr(vae.field, dec, views, cfg)
        assert fitted > 20, oid  # the dataset itself is usable
        gaps.append(fitted - ours)
    assert max(gaps) < 2.0, gaps
    assert sum(gaps) / len(gaps) < 0.5, gaps


def test_the_layout_is_checked(tiny_vae_dir):
    with pytest.raises(ParamsError, match="layout"):
        load_vae(str(tiny_vae_dir), expected_field=FieldConfig())
    vae = load_vae(str(tiny_vae_dir))
    with pytest.raises(ParamsError, match="values"):
        vae.encode(torch.zeros(2, FieldConfig().num_levels))


def test_interpolation_renders_move_monotonically_from_one_object_to_the_other(tiny_dataset, tiny_vae_dir):
    vae = load_vae(str(tiny_vae_dir))
    objs, cfg = _objects(tiny_dataset)
    by_id = {oid: (p, v) for oid, p, v in objs}
    (pa, va), (pb, vb) = by_id["single/blue/torus/s1-p0"], by_id["single/red/sphere/s1-p0"]
    with torch.no_grad():
        za, zb = vae.encode(torch.stack([pa, pb]))
        path = vae.decode(interpolate(za, zb, torch.linspace(0, 1, 5)))
    to_a = [_psnr(vae.field, p, va, cfg) for p in path]
    to_b = [_psnr(vae.field, p, vb, cfg) for p in path]
    assert all(x > y for x, y in zip(to_a, to_a[1:])), to_a  # strictly falling towards B
    assert all(x < y for x, y in zip(to_b, to_b[1:])), to_b  # strictly rising towards B
    assert to_a[0] - to_a[-1] > 5 and to_b[-1] - to_b[0] > 5  # the ends really are different objects
