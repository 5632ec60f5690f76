"""``clip``: CLIP-similarity guidance (Dream Fields / CLIP-NeRF style).

loss = guidance_scale · (1 − cos(E_img(render), target)), averaged over the batch, where the target is the CLIP
text embedding of ``ctx.prompt`` or, without a prompt, the image embedding of ``ctx.ref_image``. The render goes
through the image encoder *with* autograd (only the target is computed under no_grad, once, and cached), so the
gradient reaches the NeRF. Optional augmentation (``clip_augment``): a random square crop of 70–100 % of the side
per view, resized back, which keeps CLIP from being satisfied by adversarial pixel patterns.

The encoder comes from p2n's encoder registry (``p2n.align.encoders.build_encoder(cfg.clip_model)``).
Owns: the loss and its caching. Does not own: CLIP models or their registry.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from p2n.refine.guidance.base import (
    Guidance,
    GuidanceConfig,
    GuidanceConfigError,
    GuidanceContext,
    GuidanceInputError,
    GuidanceOutput,
    check_images,
    to_nchw,
)
from p2n.refine.guidance.registry import register_guidance

_CROP_MIN = 0.7  # smallest random crop, as a fraction of the side


@register_guidance("clip")
class ClipGuidance(Guidance):
    """1 − cosine similarity to a prompt (or reference image) in CLIP space; no diffusion model needed."""

    default_guidance_scale = 1.0  # no CFG here: the scale weights the loss

    def __init__(self, cfg: GuidanceConfig) -> None:
        super().__init__(cfg)
        from p2n.align.encoders import build_encoder

        self.encoder = build_encoder(cfg.clip_model, device=self.device)
        if not self.encoder.supports_images:
            raise GuidanceConfigError(
                f"clip_model={cfg.clip_model!r} is a text-only encoder; the clip guidance needs a CLIP encoder "
                "that embeds images too (tiny-clip, or openclip:<model>:<weights>)"
            )
        self._text_cache: dict[str, Tensor] = {}
        self._ref: Tensor | None = None
        self._ref_embed: Tensor | None = None

    def _augment(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] -> random crops [B, 3, H, W], one per view, differentiable (slice + resize)."""
        B, _, H, W = x.shape
        out = []
        for i in range(B):
            s = float(torch.empty(()).uniform_(_CROP_MIN, 1.0, generator=self.generator))
            h, w = max(int(H * s), 1), max(int(W * s), 1)
            top = int(torch.randint(0, H - h + 1, (), generator=self.generator))
            left = int(torch.randint(0, W - w + 1, (), generator=self.generator))
            crop = x[i : i + 1, :, top : top + h, left : left + w]
            out.append(F.interpolate(crop, (H, W), mode="bilinear", align_corners=False))
        return torch.cat(out)

    def embed_images(self, x: Tensor) -> Tensor:
        """x: [B, 3, H, W] in [0, 1] -> unit embeddings [B, D], differentiable w.r.t. x.

        PromptEncoder.encode_image runs under no_grad by design (stage-2 embeddings are data), so the guidance
        uses its two halves directly: the encoder's own differentiable preprocessing (antialiased resize, centre
        crop, mean/std), then its model.
        """
        pixels = self.encoder.preprocess_images(x.permute(0, 2, 3, 1))
        return F.normalize(self.encoder._encode_image(pixels).float(), dim=-1)

    def target(self, ctx: GuidanceContext) -> tuple[Tensor, str]:
        """Unit target embedding [1, D] (cached) and what it came from ("text" or "image")."""
        if ctx.prompt:
            if ctx.prompt not in self._text_cache:
                self._text_cache[ctx.prompt] = self.encoder.encode_text([ctx.prompt])  # [1, D], unit, no grad
            return self._text_cache[ctx.prompt], "text"
        if ctx.ref_image is not None:
            ref = ctx.ref_image.detach()
            if self._ref is None or self._ref.shape != ref.shape or not torch.equal(self._ref, ref):
                self._ref_embed = self.encoder.encode_image(ref[None].float())  # [1, D], unit, no grad
                self._ref = ref.clone()
            assert self._ref_embed is not None
            return self._ref_embed, "image"
        raise GuidanceInputError("the clip guidance needs a prompt or a reference image in its GuidanceContext")

    def __call__(self, images: Tensor, ctx: GuidanceContext, step: int, total_steps: int) -> GuidanceOutput:
        check_images(images, "clip")
        target, source = self.target(ctx)
        x = to_nchw(images).float()
        if self.cfg.clip_augment:
            x = self._augment(x)
        emb = self.embed_images(x)  # [B, D], with grad
        cos = emb @ target.to(emb.device).T  # [B, 1]
        loss = self.guidance_scale * (1.0 - cos).mean()
        info = {"clip_cos": float(cos.detach().mean()), "target_is_text": float(source == "text")}
        return GuidanceOutput(loss=loss, info=info)
