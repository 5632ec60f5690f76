"""Single-pass generation: prompts or images → encoder → aligner → VAE decoder → NeRF parameters → pictures.

:class:`Generator` loads a checkpoint once (the ``--out`` of ``p2n train align``: ``align.safetensors`` with its
``vae.safetensors``) and is reused — by the CLI, the demo, refinement and the Serve deployment. A batch of prompts
is one forward pass; rendering is separate so a caller can time and batch each part.

Input checks live here, before any model runs: prompts (empty, too long for the encoder, control characters) and
images (not an image, too small, too large in bytes or pixels) are rejected with errors that say what to change.

Does not own: the models (``p2n.align``, ``p2n.latent``) or rendering (``p2n.nerf.render``, ``p2n.export``).
"""

from __future__ import annotations

import dataclasses
import io
import re
import time
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from p2n.align.errors import ImageError, PromptError
from p2n.cameras import Cameras, ring_rig
from p2n.config import P2NConfig, resolve_device
from p2n.errors import P2NError
from p2n.malloc import keep_freed_memory
from p2n.nerf.field import NeRFField
from p2n.nerf.render import OccupancyGrid, render_image

MIN_IMAGE_SIDE = 8
MAX_IMAGE_PIXELS = 4096 * 4096
MAX_IMAGE_BYTES = 32 * 1024 * 1024
MAX_BATCH = 256


class CheckpointKindError(P2NError):
    """A file that is not a generator checkpoint (e.g. a NeRF params file or a bare VAE)."""


@dataclass
class Generated:
    params: Tensor  # [B, P]
    latents: Tensor  # [B, L]
    generate_ms: float


def decode_image(data: bytes, source: str = "image") -> Tensor:
    """Untrusted image bytes → RGB [H, W, 3] float in [0, 1] (alpha composited over white). Checks size first."""
    if not data:
        raise ImageError(f"{source}: empty file")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{source}: {len(data)} bytes > {MAX_IMAGE_BYTES} allowed; send a smaller image")
    try:
        img = Image.open(io.BytesIO(data))
        w, h = img.size  # header only: nothing decoded yet, so huge images are refused cheaply
    except Image.DecompressionBombError as e:
        # PIL refuses headers over twice its own pixel limit before we see the size; its message has the count.
        m = re.search(r"\((\d+) pixels\)", str(e))
        n = f"{m.group(1)} pixels" if m else "too many pixels"
        raise ImageError(f"{source}: {n} > {MAX_IMAGE_PIXELS} allowed; downscale it first") from None
    except Exception:
        raise ImageError(f"{source}: not a readable image (PNG, JPEG, ...)") from None
    if w * h > MAX_IMAGE_PIXELS:
        raise ImageError(f"{source}: {w}x{h} pixels > {MAX_IMAGE_PIXELS} allowed; downscale it first")
    if min(w, h) < MIN_IMAGE_SIDE:
        raise ImageError(f"{source}: {w}x{h} is too small; at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE} pixels needed")
    try:
        img.load()
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
    except Exception as e:
        raise ImageError(f"{source}: corrupt image data ({e})") from None
    a = rgba[..., 3:4]
    return torch.from_numpy(rgba[..., :3] * a + (1.0 - a))


def trained_on_pairs(ckpt: str, default: bool, overrides: Sequence[str] = ()) -> bool:
    """Whether the checkpoint's training data had two-object scenes: ``dataset.include_pairs`` of the run config
    that ``p2n train`` writes beside it (``config.json``); ``default`` when there is none (a bare file, a URI) or
    when ``overrides`` (``--set`` values) name that setting explicitly."""
    import json
    from pathlib import Path

    if any(o.split("=", 1)[0].strip() == "dataset.include_pairs" for o in overrides):
        return default
    try:
        return bool(json.loads((Path(ckpt) / "config.json").read_text())["dataset"]["include_pairs"])
    except (OSError, ValueError, KeyError, TypeError):
        return default


def check_prompts(prompts: Sequence[str], encoder) -> list[str]:
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise PromptError("no prompts given")
    if len(prompts) > MAX_BATCH:
        raise PromptError(f"{len(prompts)} prompts in one batch > {MAX_BATCH}; split the batch")
    return encoder.validate_prompts(prompts)


class Generator:
    """A loaded generator checkpoint; thread-compatible for inference (no state changes after load)."""

    def __init__(self, bundle, cfg: P2NConfig | None = None, source: str = ""):
        self.bundle = bundle
        self.vae = bundle.vae.freeze()  # a generator only decodes: fold the denormalisation into the decoder
        # The field layout is the VAE's: parameters it decodes only make sense in that layout.
        self.cfg = dataclasses.replace(cfg or P2NConfig(), field=self.vae.field)
        self.nerf = NeRFField(self.cfg.field)
        self.source = source
        keep_freed_memory()  # a batch of 32 decodes into ~30 MB: reused heap, not fresh page-faulted mmaps

    @classmethod
    def load(cls, ckpt: str, cfg: P2NConfig | None = None, device: str = "auto",
             storage_options: dict[str, Any] | None = None) -> "Generator":
        """Load ``ckpt`` (a folder or ``align.safetensors``; local or s3://)."""
        from p2n.align import load_aligner
        from p2n.latent.checkpoint import CheckpointError

        dev = resolve_device(device)
        try:
            bundle = load_aligner(ckpt, storage_options, dev)
        except CheckpointError as e:
            raise CheckpointKindError(f"{ckpt}: not a generator checkpoint ({e}); pass the --out folder of "
                                      "`p2n train align` (it holds align.safetensors and vae.safetensors)") from None
        return cls(bundle, cfg, ckpt)

    # ---- info ---------------------------------------------------------------------------------------------
    @property
    def text_encoder(self):
        return self.bundle.text_encoder

    @property
    def supports_images(self) -> bool:
        return self.bundle.image_encoder is not None

    def describe(self) -> dict[str, Any]:
        return {
            "checkpoint": self.source,
            "text_encoder": self.bundle.cfg.text_encoder,
            "image_encoder": self.bundle.cfg.image_encoder or None,
            "latent_dim": self.vae.latent_dim,
            "num_params": self.vae.num_params,
            "field": {k: getattr(self.cfg.field, k) for k in self.cfg.field.__dataclass_fields__},
            "layout_hash": self.cfg.field.layout_hash(),
        }

    # ---- the forward pass ---------------------------------------------------------------------------------
    @torch.no_grad()
    def from_prompts(self, prompts: Sequence[str]) -> Generated:
        """One batched forward pass: prompts → parameter vectors [B, P]."""
        prompts = check_prompts(prompts, self.bundle.text_encoder)
        t = time.perf_counter()
        z = self.bundle.latents_from_text(prompts, validated=True)
        params = self.vae.decode(z)
        return Generated(params.float(), z, (time.perf_counter() - t) * 1000)

    @torch.no_grad()
    def from_images(self, images: Tensor | Sequence[Tensor]) -> Generated:
        """RGB images ([B, H, W, 3] or a list of [H, W, 3], floats in [0, 1]) → parameter vectors [B, P]."""
        if isinstance(images, Tensor) and images.ndim == 3:
            images = images[None]
        if len(images) == 0:
            raise ImageError("no images given")
        if len(images) > MAX_BATCH:
            raise ImageError(f"{len(images)} images in one batch > {MAX_BATCH}; split the batch")
        for i, im in enumerate(images):
            if im.ndim != 3 or im.shape[-1] != 3:
                raise ImageError(f"image {i} has shape {tuple(im.shape)}; expected [H, W, 3]")
            if not torch.isfinite(im).all():
                raise ImageError(f"image {i} contains NaN/inf values")
        t = time.perf_counter()
        z = self.bundle.latents_from_images(images if isinstance(images, Tensor) else list(images))
        params = self.vae.decode(z)
        return Generated(params.float(), z, (time.perf_counter() - t) * 1000)

    def params_from_prompts(self, prompts: Sequence[str]) -> Tensor:
        return self.from_prompts(prompts).params

    def params_from_images(self, images) -> Tensor:
        return self.from_images(images).params

    @torch.no_grad()
    def mean_params(self) -> Tensor:
        return self.bundle.mean_params().float()

    @torch.no_grad()
    def latents_from_prompts(self, prompts: Sequence[str]) -> Tensor:
        return self.bundle.latents_from_text(check_prompts(prompts, self.bundle.text_encoder), validated=True)

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        return self.vae.decode(z).float()

    # ---- pictures -----------------------------------------------------------------------------------------
    def ring(self, n: int = 8, size: int | None = None, elevation_deg: float = 25.0) -> Cameras:
        s = size or self.cfg.scene.image_size
        return ring_rig(n, self.cfg.scene.camera_radius, elevation_deg, s, s, self.cfg.scene.fov_deg)

    def render(self, params: Tensor, cameras: Cameras) -> Tensor:
        """RGB [N, H, W, 3] of one parameter vector over the configured background."""
        grid = OccupancyGrid.from_params(self.nerf, params, self.cfg.render)
        rgb, _ = render_image(self.nerf, params, cameras, self.cfg.render, grid)
        return rgb
