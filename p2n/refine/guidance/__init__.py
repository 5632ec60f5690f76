"""Refinement guidances: losses on NeRF renders that pull them towards a prompt or a reference image.

``build_guidance(name, cfg)`` picks one by name from :data:`GUIDANCES`:

- ``sds``     DreamFusion score distillation through a Stable-Diffusion-layout latent diffusion model
- ``zero123`` Zero-1-to-3 score distillation conditioned on a reference image and the relative camera pose
- ``clip``    1 - cosine similarity between CLIP embeddings of the render and of the prompt (or reference image)

Other modules register more with ``@register_guidance("name")`` (the refinement loop adds ``multiview``).
Tiny random models of the same on-disk layouts, for tests and demos, are in ``p2n.refine.guidance.tiny``.
"""

from p2n.refine.guidance.base import (
    Guidance,
    GuidanceConfig,
    GuidanceConfigError,
    GuidanceContext,
    GuidanceInputError,
    GuidanceModelMissing,
    GuidanceOutput,
    UnknownGuidance,
)
from p2n.refine.guidance.registry import GUIDANCES, build_guidance, register_guidance

# Imported for their registration side effect; after the registry so they can use it.
from p2n.refine.guidance import clip as _clip  # noqa: E402,F401
from p2n.refine.guidance import sds as _sds  # noqa: E402,F401
from p2n.refine.guidance import zero123 as _zero123  # noqa: E402,F401

__all__ = [
    "GUIDANCES",
    "Guidance",
    "GuidanceConfig",
    "GuidanceConfigError",
    "GuidanceContext",
    "GuidanceInputError",
    "GuidanceModelMissing",
    "GuidanceOutput",
    "UnknownGuidance",
    "build_guidance",
    "register_guidance",
]
