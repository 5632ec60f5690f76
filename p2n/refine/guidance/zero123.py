"""``zero123``: Zero-1-to-3 score distillation, conditioned on a reference image and the relative camera pose.

Folder layout (the diffusers Zero-1-to-3 conversions, e.g. kxic/zero123-xl-diffusers, ashawkey/zero123-xl-diffusers,
written by diffusers' scripts/convert_zero123_to_diffusers.py and read by its community pipeline_zero1to3.py):

    unet/               UNet2DConditionModel, in_channels 8 = noisy latents (4) ⊕ reference-image latents (4)
    vae/                AutoencoderKL
    image_encoder/      CLIPVisionModelWithProjection (ViT-L/14: image_embeds [B, 768])
    feature_extractor/  CLIPImageProcessor (CLIP's resize size and mean/std)
    cc_projection/      Linear(768 + 4 -> 768) saved as CCProjection: "projection.weight", "projection.bias"
    scheduler/          DDIMScheduler config (scaled_linear, 0.00085 .. 0.012)

threestudio's conversion (bennyguo/zero123-diffusers) names the projection ``clip_camera_projection/`` with keys
"proj.*"; both are read (the Linear's shape comes from the weights).

Conditioning, as in the reference implementation (cvlab-columbia/zero123, ldm ``c_crossattn``/``c_concat``):
- cross-attention context [B, 1, 768] = cc_projection(CLIP image embedding ⊕ [Δpolar (rad), sin Δazimuth,
  cos Δazimuth, Δradius]). Zero123 measures the *polar* angle from the up axis, so Δpolar = -Δelevation =
  ref_elevation - elevation (threestudio does the same).
- concat latents: the VAE posterior mode of the reference image *without* scaling_factor (zero123 was trained on
  ``encode_first_stage(x).mode()``, unscaled), while the noisy latents are scaled as in SD.
- unconditional branch for CFG: zeros for both the projected context and the concat latents.

Owns: this conditioning and its cache. Does not own: the SDS step (diffusion.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from p2n.refine.guidance.base import GuidanceConfig, GuidanceContext, GuidanceInputError, GuidanceModelMissing
from p2n.refine.guidance.diffusion import LatentSDSGuidance, _frozen, _how_to_get
from p2n.refine.guidance.registry import register_guidance

PROJECTION_FOLDERS = ("cc_projection", "clip_camera_projection")
# OpenAI CLIP's normalisation; used only if the folder's feature_extractor does not say.
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def load_projection(folder: Path) -> torch.nn.Linear:
    """The pose projection Linear(D + 4 -> D) from ``cc_projection/`` (or threestudio's name), either key style."""
    for name in PROJECTION_FOLDERS:
        sub = folder / name
        if sub.is_dir():
            break
    else:
        raise GuidanceModelMissing(
            f"model_path {str(folder)!r} has neither cc_projection/ nor clip_camera_projection/; "
            + _how_to_get("zero123")
        )
    st = sorted(sub.glob("*.safetensors"))
    if st:
        from safetensors.torch import load_file

        state = load_file(str(st[0]))
    else:
        bins = sorted(sub.glob("*.bin"))
        if not bins:
            raise GuidanceModelMissing(f"{sub} holds no weights (*.safetensors or *.bin)")
        # Older conversions ship pickled .bin; weights_only refuses anything but tensors.
        state = torch.load(bins[0], map_location="cpu", weights_only=True)
    weights = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 2]
    if len(weights) != 1:
        raise GuidanceModelMissing(f"{sub}: expected one Linear weight, found keys {sorted(state)}")
    w = state[weights[0]]
    b = state.get(weights[0][: -len("weight")] + "bias")
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        linear.weight.copy_(w)
        if b is not None:
            linear.bias.copy_(b)
    return linear


@register_guidance("zero123")
class Zero123SDS(LatentSDSGuidance):
    """Image-conditioned SDS; needs ``ctx.ref_image`` and the views' ``elevation_deg``/``azimuth_deg``."""

    kind = "zero123"
    required = ("unet", "vae", "image_encoder", "scheduler")
    default_guidance_scale = 3.0  # the Zero-1-to-3 paper's and stable-dreamfusion's default for this model

    def __init__(self, cfg: GuidanceConfig) -> None:
        super().__init__(cfg)
        from transformers import CLIPVisionModelWithProjection

        self.image_encoder = _frozen(
            CLIPVisionModelWithProjection.from_pretrained(self.folder, subfolder="image_encoder",
                                                          local_files_only=True, torch_dtype=self.dtype),
            self.device,
        )
        self.cc_projection = _frozen(load_projection(self.folder).to(self.dtype), self.device)
        if self.unet.config.in_channels != 2 * self.latent_channels:
            raise GuidanceModelMissing(
                f"{self.folder}/unet has in_channels={self.unet.config.in_channels}, not {2 * self.latent_channels}"
                " (noisy ⊕ reference latents): this is not a Zero-1-to-3 UNet"
            )
        self.clip_size, self.clip_mean, self.clip_std = self._clip_preprocessing()
        self._ref: Tensor | None = None  # [H, W, 3] copy of the image the cache below was computed from
        self._ref_embed: Tensor | None = None  # [1, 1, D] CLIP image embedding
        self._ref_latents: Tensor | None = None  # [1, 4, h, w] unscaled posterior mode

    def _clip_preprocessing(self) -> tuple[int, Tensor, Tensor]:
        """CLIP input size and mean/std from feature_extractor/preprocessor_config.json (the image encoder's own
        image_size when absent). Read as JSON: we normalise tensors ourselves, differentiably and on-device."""
        size = int(self.image_encoder.config.image_size)
        mean, std = _CLIP_MEAN, _CLIP_STD
        cfg_file = self.folder / "feature_extractor" / "preprocessor_config.json"
        if cfg_file.is_file():
            pp = json.loads(cfg_file.read_text())
            mean, std = tuple(pp.get("image_mean", mean)), tuple(pp.get("image_std", std))
        as_t = lambda v: torch.tensor(v, dtype=torch.float32, device=self.device).view(1, 3, 1, 1)  # noqa: E731
        return size, as_t(mean), as_t(std)

    @torch.no_grad()
    def _encode_reference(self, ref_image: Tensor) -> None:
        if ref_image.ndim != 3 or ref_image.shape[-1] != 3:
            raise GuidanceInputError(f"ref_image must be [H, W, 3] in [0, 1]; got {tuple(ref_image.shape)}")
        x = ref_image.detach().to(self.device, torch.float32).permute(2, 0, 1)[None]  # [1, 3, H, W]
        # Centre square, as CLIPImageProcessor's resize-shortest-side + centre-crop would take it. The caller
        # composites any alpha onto a background first (zero123 was trained on objects on white).
        h, w = x.shape[-2:]
        side = min(h, w)
        x = x[..., (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
        clip_in = F.interpolate(x, (self.clip_size, self.clip_size), mode="bicubic", align_corners=False,
                                antialias=True).clamp(0, 1)
        clip_in = (clip_in - self.clip_mean) / self.clip_std
        self._ref_embed = self.image_encoder(clip_in.to(self.dtype)).image_embeds[:, None].float()  # [1, 1, D]
        vae_in = F.interpolate(x, (self.image_size, self.image_size), mode="bilinear", align_corners=False,
                               antialias=True)
        # mode() of a Gaussian posterior is its mean; unscaled (see the module docstring).
        self._ref_latents = self.encode(vae_in * 2.0 - 1.0, scaled=False)
        self._ref = ref_image.detach().clone()

    def reference(self, ref_image: Tensor) -> tuple[Tensor, Tensor]:
        """(CLIP embedding [1, 1, D], unscaled latents [1, 4, h, w]) of the reference, computed once per image."""
        if self._ref is None or self._ref.shape != ref_image.shape or not torch.equal(
            self._ref, ref_image.detach().to(self._ref.device)
        ):
            self._encode_reference(ref_image)
        assert self._ref_embed is not None and self._ref_latents is not None
        return self._ref_embed, self._ref_latents

    def pose_embedding(self, ctx: GuidanceContext, batch: int) -> Tensor:
        """[B, 4] = [Δpolar (rad), sin Δazimuth, cos Δazimuth, Δradius] of each view relative to the reference."""
        if ctx.elevation_deg is None or ctx.azimuth_deg is None:
            raise GuidanceInputError("the zero123 guidance needs each view's elevation_deg and azimuth_deg")
        el = ctx.elevation_deg.to(self.device, torch.float32).reshape(-1)
        az = ctx.azimuth_deg.to(self.device, torch.float32).reshape(-1)
        if el.numel() != batch or az.numel() != batch:
            raise GuidanceInputError(f"elevation_deg/azimuth_deg need {batch} entries (one per image); "
                                     f"got {el.numel()} and {az.numel()}")
        d_polar = torch.deg2rad(ctx.ref_elevation_deg - el)
        d_az = torch.deg2rad(az - ctx.ref_azimuth_deg)
        if ctx.radius is not None and ctx.ref_radius is not None:
            d_r = ctx.radius.to(self.device, torch.float32).reshape(-1) - ctx.ref_radius
        else:
            d_r = torch.zeros_like(el)
        return torch.stack([d_polar, torch.sin(d_az), torch.cos(d_az), d_r], dim=-1)

    def check_context(self, ctx: GuidanceContext, batch: int) -> None:
        if ctx.ref_image is None:
            raise GuidanceInputError("the zero123 guidance needs a reference image (GuidanceContext.ref_image)")
        self.pose_embedding(ctx, batch)  # raises on missing or mis-sized poses

    def predict_noise(self, noisy: Tensor, t: Tensor, ctx: GuidanceContext) -> Tensor:
        assert ctx.ref_image is not None
        B = noisy.shape[0]
        embed, ref_latents = self.reference(ctx.ref_image)
        pose = self.pose_embedding(ctx, B)[:, None, :]  # [B, 1, 4]
        cond = self.cc_projection(torch.cat([embed.expand(B, -1, -1), pose], dim=-1).to(self.dtype))  # [B, 1, D]
        context = torch.cat([torch.zeros_like(cond), cond])  # [2B, 1, D]: unconditional = zeros
        concat = torch.cat([torch.zeros_like(ref_latents).expand(B, -1, -1, -1), ref_latents.expand(B, -1, -1, -1)])
        x = torch.cat([torch.cat([noisy, noisy]), concat], dim=1).to(self.dtype)  # [2B, 8, h, w]
        tt = torch.cat([t, t])
        pred = self.unet(x, tt, encoder_hidden_states=context).sample
        return self.cfg_combine(self.to_epsilon(pred.float(), torch.cat([noisy, noisy]), tt))
