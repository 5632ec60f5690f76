"""Refinement guidances on tiny random models: gradients reach the renders, settings are honoured, the SDS and
zero123 gradients equal a by-hand computation of w(t)(ε̂ − ε) through the VAE, CLIP guidance optimises a toy image,
and misconfiguration fails with errors that say what to do."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from p2n.errors import P2NError
from p2n.refine.guidance import (
    GUIDANCES,
    GuidanceConfig,
    GuidanceConfigError,
    GuidanceContext,
    GuidanceInputError,
    GuidanceModelMissing,
    UnknownGuidance,
    build_guidance,
    register_guidance,
)
from p2n.refine.guidance.base import resolve_dtype

PROMPT = "a red chair"
OTHER_PROMPT = "a blue car"


def _images(batch: int = 2, size: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, size, size, 3, generator=g).requires_grad_(True)


def _grad(guidance, images, ctx, step=0, total=100) -> torch.Tensor:
    images = images.detach().clone().requires_grad_(True)
    out = guidance(images, ctx, step, total)
    out.loss.backward()
    return images.grad


def _fix_draws(monkeypatch, guidance, t: list[int], seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the guidance's (t, noise) draw with fixed values so two calls differ only by the setting under test."""
    t_fixed = torch.tensor(t)
    noise = torch.randn(len(t), 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    monkeypatch.setattr(guidance, "sample_t_and_noise", lambda b, shape, step, total: (t_fixed, noise))
    return t_fixed, noise


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _assert_useful_grad(grad: torch.Tensor, images: torch.Tensor) -> None:
    assert grad is not None and grad.shape == images.shape
    assert torch.isfinite(grad).all()
    assert grad.abs().sum() > 0


# ---------------------------------------------------------------- registry and errors


def test_registry_lists_choices_including_late_registrations(monkeypatch):
    assert {"sds", "zero123", "clip"} <= set(GUIDANCES)
    # The refinement loop registers "multiview" from its own module; emulate that registration.
    monkeypatch.setitem(GUIDANCES, "multiview", lambda cfg: None)
    with pytest.raises(UnknownGuidance) as err:
        build_guidance("dreamfusion", GuidanceConfig())
    msg = str(err.value)
    assert "'dreamfusion'" in msg
    for name in ("clip", "multiview", "sds", "zero123"):
        assert name in msg
    assert isinstance(err.value, P2NError)


def test_register_guidance_decorator_and_duplicate_names():
    @register_guidance("toy")
    def build_toy(cfg):
        return ("toy", cfg.seed)

    try:
        assert build_guidance("toy", GuidanceConfig(seed=7)) == ("toy", 7)
        with pytest.raises(ValueError, match="already registered"):
            register_guidance("toy")(lambda cfg: None)
    finally:
        GUIDANCES.pop("toy", None)


@pytest.mark.parametrize("name", ["sds", "zero123"])
def test_missing_model_path_says_how_to_get_weights(name):
    with pytest.raises(GuidanceModelMissing) as err:
        build_guidance(name, GuidanceConfig(model_path=None))
    msg = str(err.value)
    assert "model_path" in msg and "tiny" in msg
    assert ("save_pretrained" in msg) if name == "sds" else ("snapshot_download" in msg and "cc_projection" in msg)
    assert isinstance(err.value, P2NError)


def test_model_folder_that_is_missing_or_incomplete(tmp_path):
    with pytest.raises(GuidanceModelMissing, match="is not a folder"):
        build_guidance("sds", GuidanceConfig(model_path=str(tmp_path / "nope")))
    (tmp_path / "unet").mkdir()
    with pytest.raises(GuidanceModelMissing, match="vae/, text_encoder/, tokenizer/, scheduler/"):
        build_guidance("sds", GuidanceConfig(model_path=str(tmp_path)))


@pytest.mark.parametrize("bad", [dict(min_step_ratio=0.6, max_step_ratio=0.4), dict(max_step_ratio=1.5),
                                 dict(max_step_ratio_end=-0.1)])
def test_bad_step_ratios_are_rejected(tiny_sd_dir, bad):
    with pytest.raises(GuidanceConfigError):
        build_guidance("sds", GuidanceConfig(model_path=str(tiny_sd_dir), **bad))


def test_auto_dtype_is_float32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


# ---------------------------------------------------------------- sds


@pytest.fixture(scope="module")
def sds(tiny_sd_dir):
    return build_guidance("sds", GuidanceConfig(model_path=str(tiny_sd_dir)))


def test_sds_gradient_reaches_images(sds):
    images = _images()
    grad = _grad(sds, images, GuidanceContext(prompt=PROMPT))
    _assert_useful_grad(grad, images)
    assert sds.guidance_scale == 100.0  # DreamFusion's default when the config leaves it unset


def test_sds_requires_a_prompt(sds):
    with pytest.raises(GuidanceInputError, match="prompt"):
        sds(_images(), GuidanceContext(), 0, 10)
    with pytest.raises(GuidanceInputError, match=r"\[B, H, W, 3\]"):
        sds(torch.rand(2, 3, 32, 32), GuidanceContext(prompt=PROMPT), 0, 10)


def test_sds_timesteps_stay_in_configured_range(tiny_sd_dir):
    g = build_guidance("sds", GuidanceConfig(model_path=str(tiny_sd_dir), min_step_ratio=0.3, max_step_ratio=0.5))
    ctx = GuidanceContext(prompt=PROMPT)
    seen = []
    for step in range(6):
        info = g(_images(batch=4, size=16, seed=step), ctx, step, 6).info
        assert 300 <= info["t_min"] <= info["t"] <= info["t_max"] <= 500
        seen += [info["t_min"], info["t_max"]]
    # Many more draws straight from the sampler: the whole range is used, nothing outside it.
    t, _ = g.sample_t_and_noise(5000, (5000, 4, 1, 1), 0, 1)
    assert int(t.min()) == 300 and int(t.max()) == 500
    

def test_sds_max_step_anneals_linearly(tiny_sd_dir):
    g = build_guidance("sds", GuidanceConfig(model_path=str(tiny_sd_dir), min_step_ratio=0.1, max_step_ratio=0.9,
                                             max_step_ratio_end=0.3))
    assert g.step_range(0, 101) == (100, 900)
    assert g.step_range(50, 101) == (100, 600)
    assert g.step_range(100, 101) == (100, 300)
    t, _ = g.sample_t_and_noise(2000, (2000, 4, 1, 1), 100, 101)
    assert int(t.max()) <= 300 and int(t.min()) >= 100


def test_sds_gradient_equals_hand_computed_score_distillation(tiny_sd_dir, monkeypatch):
    """images.grad == J_E(x)^T · w(t)(ε̂_cfg − ε) / B, with every piece recomputed here from the folder."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    scale = 7.5
    g = build_guidance("sds", GuidanceConfig(model_path=str(tiny_sd_dir), guidance_scale=scale))
    t, noise = _fix_draws(monkeypatch, g, [123, 777])
    images = _images(batch=2, size=40)
    ctx = GuidanceContext(prompt=PROMPT, negative_prompt="blurry")
    out = g(images, ctx, 0, 1)
    out.loss.backward()

    vae = AutoencoderKL.from_pretrained(tiny_sd_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tiny_sd_dir, subfolder="unet")
    tok = CLIPTokenizer.from_pretrained(tiny_sd_dir, subfolder="tokenizer")
    text = CLIPTextModel.from_pretrained(tiny_sd_dir, subfolder="text_encoder")
    abar = DDPMScheduler.from_pretrained(tiny_sd_dir, subfolder="scheduler").alphas_cumprod[t].view(-1, 1, 1, 1)

    x = images.detach().clone().requires_grad_(True)
    x64 = F.interpolate(x.permute(0, 3, 1, 2), (64, 64), mode="bilinear", align_corners=False) * 2 - 1
    z = vae.encode(x64).latent_dist.mean * 0.18215
    with torch.no_grad():
        zt = abar.sqrt() * z + (1 - abar).sqrt() * noise
        ids = tok(["blurry", PROMPT], padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt").input_ids
        neg, pos = text(ids).last_hidden_state.split(1)
        eps_u = unet(zt, t, encoder_hidden_states=neg.expand(2, -1, -1)).sample
        eps_c = unet(zt, t, encoder_hidden_states=pos.expand(2, -1, -1)).sample
        sds_grad = (1 - abar) * (eps_u + scale * (eps_c - eps_u) - noise)
    (expected,) = torch.autograd.grad(z, x, grad_outputs=sds_grad / 2)
    assert _rel_err(images.grad, expected) < 1e-4
    assert out.loss.item() == pytest.approx(0.5 * float(sds_grad.pow(2).sum()) / 2, rel=1e-4)
    assert out.info["t"] == pytest.approx(450.0) and out.info["t_min"] == 123 and out.info["t_max"] == 777


def test_sds_settings_change_the_gradient(tiny_sd_dir, monkeypatch):
    base = GuidanceConfig(model_path=str(tiny_sd_dir))
    g1 = build_guidance("sds", replace(base, guidance_scale=1.0))
    g50 = build_guidance("sds", replace(base, guidance_scale=50.0))
    for g in (g1, g50):
        _fix_draws(monkeypatch, g, [400, 600])
    images, ctx = _images(), GuidanceContext(prompt=PROMPT)
    a, a_again = _grad(g1, images, ctx), _grad(g1, images, ctx)
    assert torch.equal(a, a_again)  # fixed draws: any difference below comes from the setting alone
    assert _rel_err(_grad(g50, images, ctx), a) > 0.1
    assert _rel_err(_grad(g1, images, GuidanceContext(prompt=OTHER_PROMPT)), a) > 1e-3
    assert _rel_err(_grad(g1, images, GuidanceContext(prompt=PROMPT, negative_prompt="ugly")), a) == 0.0  # s=1
    assert _rel_err(_grad(g50, images, GuidanceContext(prompt=PROMPT, negative_prompt="ugly")),
                    _grad(g50, images, ctx)) > 1e-3


def test_v_prediction_output_is_converted_to_noise(sds, monkeypatch):
    """SD 2.1 (768) predicts v = α ε − σ z0; SDS needs ε back: ε = α v + σ z_t."""
    monkeypatch.setattr(sds, "prediction_type", "v_prediction")
    gen = torch.Generator().manual_seed(2)
    z0, eps = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([50, 900])
    a = sds.alphas_cumprod[t].view(-1, 1, 1, 1)
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * z0
    assert torch.allclose(sds.to_epsilon(v, zt, t), eps, atol=1e-5)


def test_sds_text_embeddings_are_computed_once(tiny_sd_dir):
    g = build_guidance("sds", GuidanceConfig(model_path=str(tiny_sd_dir)))
    calls = []
    g.text_encoder.register_forward_hook(lambda *a: calls.append(1))
    for step in range(3):
        g(_images(size=16), GuidanceContext(prompt=PROMPT), step, 3)
    assert len(calls) == 1
    g(_images(size=16), GuidanceContext(prompt=OTHER_PROMPT), 3, 4)
    assert len(calls) == 2


def test_sds_from_tiny_keyword_builds_and_runs():
    g = build_guidance("sds", GuidanceConfig(model_path="tiny", seed=3))
    assert g.image_size == 64
    _assert_useful_grad(_grad(g, _images(batch=1), GuidanceContext(prompt=PROMPT)), _images(batch=1))


# ---------------------------------------------------------------- zero123


def _z_ctx(ref, el=(10.0, 40.0), az=(30.0, 200.0), **kw) -> GuidanceContext:
    return GuidanceContext(ref_image=ref, elevation_deg=torch.tensor(el), azimuth_deg=torch.tensor(az),
                           radius=torch.tensor([4.0] * len(el)), **kw)


def _ref(seed: int = 5, size: int = 40) -> torch.Tensor:
    return torch.rand(size, size, 3, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def zero123(tiny_zero123_dir):
    return build_guidance("zero123", GuidanceConfig(model_path=str(tiny_zero123_dir)))


def test_zero123_gradient_reaches_images(zero123):
    images = _images()
    _assert_useful_grad(_grad(zero123, images, _z_ctx(_ref())), images)
    assert zero123.guidance_scale == 3.0


def test_zero123_needs_reference_and_poses(zero123):
    with pytest.raises(GuidanceInputError, match="reference image"):
        zero123(_images(), GuidanceContext(elevation_deg=torch.zeros(2), azimuth_deg=torch.zeros(2)), 0, 1)
    with pytest.raises(GuidanceInputError, match="elevation_deg"):
        zero123(_images(), GuidanceContext(ref_image=_ref()), 0, 1)
    with pytest.raises(GuidanceInputError, match="2 entries"):
        zero123(_images(), _z_ctx(_ref(), el=(1.0, 2.0, 3.0), az=(0.0, 0.0, 0.0)), 0, 1)


def test_zero123_pose_embedding_convention(zero123):
    """[Δpolar, sin Δaz, cos Δaz, Δr]; polar is measured from the up axis, so raising the camera lowers it."""
    ctx = _z_ctx(_ref(), el=(30.0, 0.0), az=(100.0, 10.0), ref_elevation_deg=0.0, ref_azimuth_deg=10.0)
    pose = zero123.pose_embedding(ctx, 2)
    expected = torch.tensor([[-math.pi / 6, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert torch.allclose(pose, expected, atol=1e-6)
    pose_r = zero123.pose_embedding(replace(ctx, radius=torch.tensor([4.5, 3.0]), ref_radius=4.0), 2)
    assert torch.allclose(pose_r[:, 3], torch.tensor([0.5, -1.0]))


def test_zero123_gradient_equals_hand_computed(tiny_zero123_dir, monkeypatch):
    """Conditioning rebuilt by hand from the folder: CLIP image embedding ⊕ pose -> cc_projection (read from its
    safetensors), *unscaled* reference latents concatenated on channels, zeros as the unconditional branch."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPVisionModelWithProjection

    scale = 4.0
    g = build_guidance("zero123", GuidanceConfig(model_path=str(tiny_zero123_dir), guidance_scale=scale))
    t, noise = _fix_draws(monkeypatch, g, [250, 850])
    images, ref = _images(batch=2, size=40), _ref()
    ctx = _z_ctx(ref, el=(10.0, 40.0), az=(30.0, 200.0), ref_elevation_deg=5.0, ref_azimuth_deg=20.0, ref_radius=3.5)
    g(images, ctx, 0, 1).loss.backward()

    vae = AutoencoderKL.from_pretrained(tiny_zero123_dir, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tiny_zero123_dir, subfolder="unet")
    enc = CLIPVisionModelWithProjection.from_pretrained(tiny_zero123_dir, subfolder="image_encoder")
    proj = load_file(str(Path(tiny_zero123_dir) / "cc_projection" / "diffusion_pytorch_model.safetensors"))
    pp = json.loads((Path(tiny_zero123_dir) / "feature_extractor" / "preprocessor_config.json").read_text())
    abar = g.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)

    x = images.detach().clone().requires_grad_(True)
    z = vae.encode(F.interpolate(x.permute(0, 3, 1, 2), (64, 64), mode="bilinear") * 2 - 1).latent_dist.mean * 0.18215
    with torch.no_grad():
        r = ref.permute(2, 0, 1)[None]
        clip_in = F.interpolate(r, (32, 32), mode="bicubic", antialias=True).clamp(0, 1)
        mean, std = (torch.tensor(pp[k]).view(1, 3, 1, 1) for k in ("image_mean", "image_std"))
        clip_in = (clip_in - mean) / std
        emb = enc(clip_in).image_embeds  # [1, 32]
        d_el = torch.deg2rad(torch.tensor([5.0 - 10.0, 5.0 - 40.0]))
        d_az = torch.deg2rad(torch.tensor([30.0 - 20.0, 200.0 - 20.0]))
        pose = torch.stack([d_el, d_az.sin(), d_az.cos(), torch.full((2,), 0.5)], -1)
        cond = F.linear(torch.cat([emb.expand(2, -1), pose], -1), proj["projection.weight"], proj["projection.bias"])
        ref_lat = vae.encode(F.interpolate(r, (64, 64), mode="bilinear", antialias=True) * 2 - 1).latent_dist.mode()
        zt = abar.sqrt() * z + (1 - abar).sqrt() * noise
        eps_c = unet(torch.cat([zt, ref_lat.expand(2, -1, -1, -1)], 1), t, encoder_hidden_states=cond[:, None]).sample
        eps_u = unet(torch.cat([zt, torch.zeros_like(zt)], 1), t,
                     encoder_hidden_states=torch.zeros_like(cond[:, None])).sample
        sds_grad = (1 - abar) * (eps_u + scale * (eps_c - eps_u) - noise)
    (expected,) = torch.autograd.grad(z, x, grad_outputs=sds_grad / 2)
    assert _rel_err(images.grad, expected) < 1e-4


def test_zero123_settings_change_the_gradient(tiny_zero123_dir, monkeypatch):
    base = GuidanceConfig(model_path=str(tiny_zero123_dir))
    g1, g50 = build_guidance("zero123", replace(base, guidance_scale=1.0)), build_guidance(
        "zero123", replace(base, guidance_scale=50.0))
    for g in (g1, g50):
        _fix_draws(monkeypatch, g, [300, 700])
    images, ref = _images(), _ref()
    a = _grad(g1, images, _z_ctx(ref))
    assert torch.equal(a, _grad(g1, images, _z_ctx(ref)))
    assert _rel_err(_grad(g50, images, _z_ctx(ref)), a) > 0.1
    assert _rel_err(_grad(g1, images, _z_ctx(_ref(seed=6))), a) > 1e-3  # another reference image
    assert _rel_err(_grad(g1, images, _z_ctx(ref, az=(120.0, 200.0))), a) > 1e-4  # another view
    # Azimuth enters only through sin/cos: a full turn changes nothing.
    assert _rel_err(_grad(g1, images, _z_ctx(ref, az=(390.0, -160.0))), a) < 1e-5


def test_zero123_reads_both_projection_layouts(tmp_path):
    """diffusers' conversion: cc_projection/ "projection.*" (safetensors); threestudio's: clip_camera_projection/
    "proj.*" (here as a pickled .bin, read with weights_only)."""
    from safetensors.torch import save_file

    from p2n.refine.guidance.zero123 import load_projection

    w, b = torch.randn(8, 12), torch.randn(8)
    (tmp_path / "a" / "cc_projection").mkdir(parents=True)
    save_file({"projection.weight": w, "projection.bias": b},
              str(tmp_path / "a" / "cc_projection" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "b" / "clip_camera_projection").mkdir(parents=True)
    torch.save({"proj.weight": w, "proj.bias": b},
               tmp_path / "b" / "clip_camera_projection" / "diffusion_pytorch_model.bin")
    x = torch.randn(3, 12)
    for sub in ("a", "b"):
        lin = load_projection(tmp_path / sub)
        assert (lin.in_features, lin.out_features) == (12, 8)
        assert torch.allclose(lin(x), x @ w.T + b)
    with pytest.raises(GuidanceModelMissing, match="cc_projection"):
        load_projection(tmp_path)


def test_zero123_reference_is_encoded_once(tiny_zero123_dir):
    g = build_guidance("zero123", GuidanceConfig(model_path=str(tiny_zero123_dir)))
    calls = []
    g.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    ref = _ref()
    for step in range(3):
        g(_images(size=16), _z_ctx(ref.clone()), step, 3)  # equal content, new tensor: still cached
    assert len(calls) == 1
    g(_images(size=16), _z_ctx(_ref(seed=9)), 3, 4)
    assert len(calls) == 2


def test_zero123_timesteps_stay_in_configured_range(tiny_zero123_dir):
    g = build_guidance("zero123", GuidanceConfig(model_path=str(tiny_zero123_dir), min_step_ratio=0.25,
                                                 max_step_ratio=0.35))
    for step in range(4):
        info = g(_images(batch=2, size=16), _z_ctx(_ref()), step, 4).info
        assert 250 <= info["t_min"] <= info["t_max"] <= 350


# ---------------------------------------------------------------- clip


@pytest.fixture(scope="module")
def clip():
    return build_guidance("clip", GuidanceConfig(clip_model="tiny-clip"))


def test_clip_gradient_reaches_images(clip):
    images = _images()
    _assert_useful_grad(_grad(clip, images, GuidanceContext(prompt=PROMPT)), images)


def test_clip_settings_change_the_gradient(clip):
    images, ctx = _images(), GuidanceContext(prompt=PROMPT)
    g50 = build_guidance("clip", GuidanceConfig(clip_model="tiny-clip", guidance_scale=50.0))
    a = _grad(clip, images, ctx)
    assert _rel_err(_grad(g50, images, ctx), 50 * a) < 1e-5  # the scale weights the loss, exactly
    assert _rel_err(_grad(clip, images, GuidanceContext(prompt=OTHER_PROMPT)), a) > 0.05
    # Augmentation: reproducible from the seed, and really applied.
    aug = [build_guidance("clip", GuidanceConfig(clip_model="tiny-clip", clip_augment=True, seed=4)) for _ in "ab"]
    b = _grad(aug[0], images, ctx)
    assert torch.equal(b, _grad(aug[1], images, ctx))
    assert _rel_err(b, a) > 0.05


def test_clip_reference_image_target(clip):
    ref = _ref(size=48)
    out = clip(ref[None].clone().requires_grad_(True), GuidanceContext(ref_image=ref), 0, 1)
    # The render path (with grad) and the reference path (encoder's public no-grad API) embed identically.
    assert out.loss.item() == pytest.approx(0.0, abs=1e-5)
    assert out.info["target_is_text"] == 0.0
    assert clip(_images(), GuidanceContext(ref_image=ref), 0, 1).loss.item() > 1e-3
    with pytest.raises(GuidanceInputError, match="prompt or a reference image"):
        clip(_images(), GuidanceContext(), 0, 1)


def test_clip_text_target_is_encoded_once(clip, monkeypatch):
    calls = []
    original = clip.encoder.encode_text
    monkeypatch.setattr(clip.encoder, "encode_text", lambda prompts: calls.append(prompts) or original(prompts))
    for step in range(3):
        clip(_images(size=16), GuidanceContext(prompt="a green lamp"), step, 3)
    assert calls == [["a green lamp"]]


def test_clip_loss_falls_when_optimising_a_toy_image(clip):
    """A learnable 32x32 image (sigmoid of logits) driven by Adam on the clip loss alone."""
    logits = (0.5 * torch.randn(1, 32, 32, 3, generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    opt = torch.optim.Adam([logits], lr=0.05)
    ctx = GuidanceContext(prompt=PROMPT)
    losses = []
    for step in range(30):
        out = clip(torch.sigmoid(logits), ctx, step, 30)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_clip_rejects_text_only_encoders():
    with pytest.raises(GuidanceConfigError, match="text-only"):
        build_guidance("clip", GuidanceConfig(clip_model="hash"))
