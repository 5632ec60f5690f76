"""Score distillation machinery shared by the latent-diffusion guidances (``sds``, ``zero123``).

Owns: finding and validating a local diffusers model folder (or building the tiny one), loading the VAE, UNet
and noise schedule from it, encoding renders to latents, sampling timesteps and noise, and turning a noise
prediction into the SDS loss. Subclasses own only their conditioning (text for ``sds``, image + pose for
``zero123``) in :meth:`LatentSDSGuidance.predict_noise`.

Score distillation (DreamFusion, Poole et al. 2022): for latents z = E(x) of a render x, noise ε and timestep t,
z_t = sqrt(ᾱ_t) z + sqrt(1 - ᾱ_t) ε, the gradient w.r.t. z is w(t) (ε̂(z_t; y, t) - ε), skipping the UNet's
Jacobian. We use w(t) = 1 - ᾱ_t (DreamFusion's σ_t²) and write it as the loss 0.5 ||z - sg(z - grad)||² / B,
whose gradient w.r.t. z is exactly grad / B, so autograd carries it through the VAE encoder into the NeRF.

Does not own: the NeRF, the loop, or any conditioning encoder.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from p2n.align._torchvision_compat import ensure_torchvision_importable
from p2n.refine.guidance.base import (
    Guidance,
    GuidanceConfig,
    GuidanceConfigError,
    GuidanceContext,
    GuidanceModelMissing,
    GuidanceOutput,
    check_images,
    to_nchw,
)

# Per-process cache of tiny models built for model_path="tiny": building is a few seconds, loading is instant.
_TINY_FOLDERS: dict[tuple[str, int], Path] = {}


def _how_to_get(kind: str) -> str:
    if kind == "zero123":
        return (
            "point model_path at a local diffusers folder in the Zero-1-to-3 layout (unet/, vae/, image_encoder/, "
            "feature_extractor/, cc_projection/, scheduler/), e.g. a snapshot of 'kxic/zero123-xl-diffusers' or "
            "'ashawkey/zero123-xl-diffusers' downloaded on a machine with internet "
            "(huggingface_hub.snapshot_download(repo_id, local_dir=...)) and copied here; "
            "or model_path='tiny' for a random tiny model (tests and demos only)"
        )
    return (
        "point model_path at a local diffusers folder in the Stable Diffusion layout (unet/, vae/, text_encoder/, "
        "tokenizer/, scheduler/), e.g. on a machine with internet run "
        "StableDiffusionPipeline.from_pretrained('stabilityai/stable-diffusion-2-1-base').save_pretrained(DIR) "
        "and copy DIR here; or model_path='tiny' for a random tiny model (tests and demos only)"
    )


def resolve_model_folder(model_path: str | None, kind: str, required: tuple[str, ...], seed: int) -> Path:
    """The folder to load from, after checking it holds every component subfolder in ``required``."""
    if model_path is None:
        raise GuidanceModelMissing(f"the {kind} guidance needs a diffusion model but model_path is not set; "
                                   + _how_to_get(kind))
    if model_path == "tiny":
        key = (kind, seed)
        if key not in _TINY_FOLDERS:
            import atexit
            import shutil
            import tempfile

            from p2n.refine.guidance import tiny

            folder = Path(tempfile.mkdtemp(prefix=f"p2n-tiny-{kind}-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            (tiny.build_tiny_zero123 if kind == "zero123" else tiny.build_tiny_sd)(folder, seed=seed)
            _TINY_FOLDERS[key] = folder
        return _TINY_FOLDERS[key]
    folder = Path(os.path.expanduser(model_path))
    if not folder.is_dir():
        raise GuidanceModelMissing(f"model_path {str(folder)!r} is not a folder; " + _how_to_get(kind))
    missing = [name for name in required if not (folder / name).is_dir()]
    if missing:
        raise GuidanceModelMissing(
            f"model_path {str(folder)!r} lacks {', '.join(m + '/' for m in missing)}; " + _how_to_get(kind)
        )
    return folder


def _frozen(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    # Frozen weights: gradients still flow *through* the VAE encoder (and CLIP) to the images, never into them.
    module.requires_grad_(False)
    return module.eval().to(device)


class LatentSDSGuidance(Guidance):
    """Score distillation with a latent diffusion model (VAE + UNet + DDPM noise schedule) from a local folder."""

    kind: str = "sds"  # which layout/error text; set by subclasses
    required: tuple[str, ...] = ("unet", "vae", "scheduler")

    def __init__(self, cfg: GuidanceConfig) -> None:
        super().__init__(cfg)
        _check_step_ratios(cfg)
        # Config mistakes fail before the multi-second diffusers import.
        self.folder = resolve_model_folder(cfg.model_path, self.kind, self.required, cfg.seed)
        ensure_torchvision_importable()  # diffusers/transformers import torchvision
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

        load: dict[str, Any] = {"local_files_only": True, "torch_dtype": self.dtype}
        self.vae = _frozen(AutoencoderKL.from_pretrained(self.folder, subfolder="vae", **load), self.device)
        self.unet = _frozen(UNet2DConditionModel.from_pretrained(self.folder, subfolder="unet", **load), self.device)
        # Only the forward (noising) process is used, whatever sampler the folder ships (SD: PNDM/DDIM/Euler,
        # zero123: DDIM): they all share the beta schedule in scheduler_config.json, which DDPMScheduler reads.
        self.scheduler = DDPMScheduler.from_pretrained(self.folder, subfolder="scheduler", local_files_only=True)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(self.device, torch.float32)  # [T]
        self.prediction_type = self.scheduler.config.prediction_type  # SD 2.1 (768) is v_prediction
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_channels = int(self.vae.config.latent_channels)
        self.image_size = int(cfg.image_size or self.unet.config.sample_size * self.vae_scale)
        if self.image_size % self.vae_scale:
            raise GuidanceConfigError(
                f"image_size {self.image_size} is not a multiple of the VAE's downscale {self.vae_scale}"
            )

    # ----- timesteps and noise -----

    def step_range(self, step: int, total_steps: int) -> tuple[int, int]:
        """Inclusive timestep range [lo, hi] at this step, with the optional linear anneal of the upper end."""
        cfg = self.cfg
        max_ratio = cfg.max_step_ratio
        if cfg.max_step_ratio_end is not None:
            frac = min(max(step / max(total_steps - 1, 1), 0.0), 1.0)
            max_ratio = cfg.max_step_ratio + frac * (cfg.max_step_ratio_end - cfg.max_step_ratio)
        max_ratio = max(max_ratio, cfg.min_step_ratio)  # the anneal may not cross the lower end
        T = self.num_train_timesteps
        # ceil/floor keep every sampled t inside [min_ratio·T, max_ratio·T] (the 1e-6 absorbs float error such as
        # 0.07 * 1000 = 70.00000000000001); clamp to valid indices [0, T-1].
        lo = min(max(math.ceil(cfg.min_step_ratio * T - 1e-6), 0), T - 1)
        hi = min(max(math.floor(max_ratio * T + 1e-6), lo), T - 1)
        return lo, hi

    def sample_t_and_noise(self, batch: int, latent_shape: tuple[int, ...], step: int,
                           total_steps: int) -> tuple[Tensor, Tensor]:
        """t: [B] int64 (one per view: less variance than one per batch), noise: latent_shape, float32."""
        lo, hi = self.step_range(step, total_steps)
        t = torch.randint(lo, hi + 1, (batch,), generator=self.generator)
        noise = torch.randn(latent_shape, generator=self.generator)
        return t.to(self.device), noise.to(self.device)

    # ----- VAE -----

    def to_model_input(self, images: Tensor) -> Tensor:
        """[B, H, W, 3] in [0, 1] -> [B, 3, S, S] in [-1, 1] at the model's image size, differentiably."""
        x = to_nchw(images).to(self.device, torch.float32)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return x * 2.0 - 1.0

    def encode(self, x: Tensor, scaled: bool = True) -> Tensor:
        """[B, 3, S, S] in [-1, 1] -> latents [B, C, S/8, S/8].

        The posterior mean, not a sample: SD's posterior std is tiny, and a deterministic encoding keeps the SDS
        gradient's only randomness in (t, ε). ``scaled`` multiplies by the VAE's scaling_factor, the space the
        UNet denoises in; zero123's conditioning latents are the one place it is off (see zero123.py).
        """
        z = self.vae.encode(x.to(self.dtype)).latent_dist.mean.float()
        return z * float(self.vae.config.scaling_factor) if scaled else z

    # ----- the SDS step -----

    def to_epsilon(self, pred: Tensor, noisy: Tensor, t: Tensor) -> Tensor:
        """The UNet's output as a noise prediction (v-prediction models are converted)."""
        if self.prediction_type == "epsilon":
            return pred
        if self.prediction_type == "v_prediction":
            a = self.alphas_cumprod[t].view(-1, 1, 1, 1)
            return a.sqrt() * pred + (1 - a).sqrt() * noisy  # ε = α v + σ z_t
        raise GuidanceConfigError(f"prediction_type {self.prediction_type!r} is not supported by SDS")

    def check_context(self, ctx: GuidanceContext, batch: int) -> None:
        """Raise GuidanceInputError when ctx lacks what predict_noise needs (checked before any model runs)."""

    def predict_noise(self, noisy: Tensor, t: Tensor, ctx: GuidanceContext) -> Tensor:
        """CFG noise prediction ε̂ [B, C, h, w] float32 for noisy latents [B, C, h, w]; no grad needed."""
        raise NotImplementedError

    def cfg_combine(self, pred: Tensor) -> Tensor:
        """[2B, ...] = (unconditional, conditional) -> ε_u + s (ε_c - ε_u)."""
        uncond, cond = pred.float().chunk(2)
        return uncond + self.guidance_scale * (cond - uncond)

    def __call__(self, images: Tensor, ctx: GuidanceContext, step: int, total_steps: int) -> GuidanceOutput:
        check_images(images, self.kind)
        B = images.shape[0]
        self.check_context(ctx, B)
        latents = self.encode(self.to_model_input(images))  # [B, 4, h, w], carries grad to images
        t, noise = self.sample_t_and_noise(B, tuple(latents.shape), step, total_steps)
        with torch.no_grad():
            noisy = self.scheduler.add_noise(latents.detach(), noise, t)
            eps = self.predict_noise(noisy, t, ctx)
        w = (1.0 - self.alphas_cumprod[t]).view(B, 1, 1, 1)
        # nan_to_num: one bad half-precision UNet output must not poison the NeRF parameters.
        grad = torch.nan_to_num(w * (eps - noise))
        target = (latents - grad).detach()
        loss = 0.5 * F.mse_loss(latents, target, reduction="sum") / B  # d loss / d latents = grad / B
        lo, hi = self.step_range(step, total_steps)
        info = {
            "t": float(t.float().mean()),
            "t_min": float(t.min()),
            "t_max": float(t.max()),
            "max_step": float(hi),
            "min_step": float(lo),
            "w": float(w.mean()),
            "grad_norm": float(grad.norm() / B),
            "guidance_scale": self.guidance_scale,
        }
        return GuidanceOutput(loss=loss, info=info)


def _check_step_ratios(cfg: GuidanceConfig) -> None:
    ratios = {"min_step_ratio": cfg.min_step_ratio, "max_step_ratio": cfg.max_step_ratio}
    if cfg.max_step_ratio_end is not None:
        ratios["max_step_ratio_end"] = cfg.max_step_ratio_end
    for key, value in ratios.items():
        if not 0.0 <= value <= 1.0:
            raise GuidanceConfigError(f"{key}={value} is outside [0, 1]; it is a fraction of the diffusion steps")
    if cfg.min_step_ratio > cfg.max_step_ratio:
        raise GuidanceConfigError(
            f"min_step_ratio={cfg.min_step_ratio} > max_step_ratio={cfg.max_step_ratio}; swap them"
        )
