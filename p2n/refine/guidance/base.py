"""What every refinement guidance shares: its config, its per-call context, its output and its interface.

A guidance turns images rendered by the NeRF into a scalar loss whose gradient says how the images should change
(score distillation through a diffusion model, CLIP similarity, ...). The refinement loop only ever sees
:class:`Guidance`; which one runs is a name in the config (see ``p2n.refine.guidance.build_guidance``).

Owns: :class:`GuidanceContext`, :class:`GuidanceOutput`, the :class:`Guidance` base
class, device/dtype resolution and the guidance errors. :class:`GuidanceConfig` lives in ``p2n.config``
(``RefineConfig.guidance``) and is re-exported here. Does not own: any model, the renderer or the loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor

from p2n.config import GuidanceConfig  # noqa: F401  (defined with every other setting; re-exported here)
from p2n.errors import P2NError


class UnknownGuidance(P2NError):
    """A guidance name that nobody registered."""


class GuidanceModelMissing(P2NError):
    """The diffusion model a guidance needs is not configured or not where the config says."""


class GuidanceInputError(P2NError):
    """The images or the context handed to a guidance are not what it needs (shape, missing prompt, ...)."""


class GuidanceConfigError(P2NError):
    """A guidance setting out of range."""


@dataclass
class GuidanceContext:
    """What a guidance conditions on, for one batch of B rendered views.

    Embeddings derived from the prompt or the reference image are cached by the guidance, so passing the same
    context every step costs nothing extra.
    """

    prompt: str | None = None
    negative_prompt: str | None = None
    ref_image: Tensor | None = None  # [H, W, 3] in [0, 1]: zero123's input view, or clip's target without prompt
    # Camera of each rendered view (degrees, world units); zero123 conditions on the pose relative to the reference.
    elevation_deg: Tensor | None = None  # [B]
    azimuth_deg: Tensor | None = None  # [B]
    radius: Tensor | None = None  # [B]
    ref_elevation_deg: float = 0.0
    ref_azimuth_deg: float = 0.0
    ref_radius: float | None = None  # None: no radius change is conditioned on (Δradius = 0)


@dataclass
class GuidanceOutput:
    loss: Tensor  # scalar; backward() sends the guidance gradient into the images (and on into the NeRF)
    info: dict[str, float] = field(default_factory=dict)  # logged scalars: t, grad_norm, ...


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    if spec == "auto":
        if device.type != "cuda":
            return torch.float32  # half precision on CPU is slow and some ops lack kernels
        # bf16 keeps fp32's range, so VAE activations cannot overflow the way they can in fp16.
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[spec]


class Guidance:
    """A loss on rendered images. Subclasses register under a name and implement :meth:`__call__`."""

    name: ClassVar[str] = ""
    default_guidance_scale: ClassVar[float] = 1.0

    def __init__(self, cfg: GuidanceConfig) -> None:
        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        # A private CPU generator: the same seed gives the same timesteps/noise on any device, and the caller's
        # global RNG stream is left alone.
        self.generator = torch.Generator().manual_seed(cfg.seed)

    @property
    def guidance_scale(self) -> float:
        return self.default_guidance_scale if self.cfg.guidance_scale is None else float(self.cfg.guidance_scale)

    def __call__(self, images: Tensor, ctx: GuidanceContext, step: int, total_steps: int) -> GuidanceOutput:
        """images: [B, H, W, 3] in [0, 1], rendered with grad; step in [0, total_steps)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, device={self.device}, dtype={self.dtype})"


def check_images(images: Tensor, who: str) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise GuidanceInputError(
            f"{who} guidance expects rendered images [B, H, W, 3] in [0, 1]; got shape {tuple(images.shape)}"
        )


def to_nchw(images: Tensor) -> Tensor:
    """[B, H, W, 3] -> [B, 3, H, W] (the layout every conv net here wants)."""
    return images.permute(0, 3, 1, 2)
