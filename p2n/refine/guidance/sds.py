"""``sds``: DreamFusion score distillation with a text-conditioned Stable-Diffusion-layout model.

Loads ``unet/``, ``vae/``, ``text_encoder/`` (CLIPTextModel), ``tokenizer/`` (CLIPTokenizer) and ``scheduler/``
from a local diffusers folder (``local_files_only``: nothing is downloaded) and adds the text conditioning to the
shared SDS step of :mod:`p2n.refine.guidance.diffusion`: the unconditional (negative-prompt, default "") and
conditional embeddings are batched in one UNet call for classifier-free guidance. Embeddings are computed once
per (prompt, negative prompt) and cached.

Does not own: the SDS step itself (diffusion.py) or the prompt's meaning.
"""

from __future__ import annotations

import torch
from torch import Tensor

from p2n.refine.guidance.base import GuidanceConfig, GuidanceContext, GuidanceInputError
from p2n.refine.guidance.diffusion import LatentSDSGuidance, _frozen
from p2n.refine.guidance.registry import register_guidance


@register_guidance("sds")
class StableDiffusionSDS(LatentSDSGuidance):
    """Text-to-image score distillation; ``ctx.prompt`` is required."""

    kind = "sds"
    required = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
    # DreamFusion's large CFG scale: SDS with ordinary scales (7.5) gives over-smoothed, washed-out objects.
    default_guidance_scale = 100.0

    def __init__(self, cfg: GuidanceConfig) -> None:
        super().__init__(cfg)
        from transformers import CLIPTextModel, CLIPTokenizer

        self.tokenizer = CLIPTokenizer.from_pretrained(self.folder, subfolder="tokenizer", local_files_only=True)
        self.text_encoder = _frozen(
            CLIPTextModel.from_pretrained(self.folder, subfolder="text_encoder", local_files_only=True,
                                          torch_dtype=self.dtype),
            self.device,
        )
        self._text_cache: dict[tuple[str, str], Tensor] = {}

    @torch.no_grad()
    def _embed(self, texts: list[str]) -> Tensor:
        """[N, L, D] last hidden states, padded to the tokenizer's max length as SD was trained."""
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text_encoder(ids.to(self.device))[0]

    def text_embeddings(self, prompt: str, negative_prompt: str | None) -> Tensor:
        """[2, L, D] = (unconditional, conditional), cached per (prompt, negative prompt)."""
        key = (prompt, negative_prompt or "")
        if key not in self._text_cache:
            self._text_cache[key] = self._embed([key[1], key[0]])
        return self._text_cache[key]

    def check_context(self, ctx: GuidanceContext, batch: int) -> None:
        if not ctx.prompt:
            raise GuidanceInputError("the sds guidance needs a text prompt (GuidanceContext.prompt)")

    def predict_noise(self, noisy: Tensor, t: Tensor, ctx: GuidanceContext) -> Tensor:
        assert ctx.prompt is not None
        B = noisy.shape[0]
        emb = self.text_embeddings(ctx.prompt, ctx.negative_prompt)  # [2, L, D]
        emb = emb.repeat_interleave(B, dim=0)  # [2B, L, D]: B unconditional, then B conditional
        x = torch.cat([noisy, noisy]).to(self.dtype)  # [2B, 4, h, w]
        tt = torch.cat([t, t])
        pred = self.unet(x, tt, encoder_hidden_states=emb).sample
        return self.cfg_combine(self.to_epsilon(pred.float(), x.float(), tt))
