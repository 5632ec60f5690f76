"""Refinement: a NeRF from an initialization (generated, mean latent, or the shared scratch init) refined by a
guidance — score distillation (``sds``, ``zero123``), CLIP similarity (``clip``) or posed views (``multiview``).

``refine_object`` is the one-call form; ``refine`` is the loop itself; ``compare_inits`` draws several
initializations of one object in one plot. See ``loop.py`` for the loop, ``init.py`` for the initializations,
``target.py`` for what a refinement pulls towards and ``guidance/`` for the guidances.
"""

from p2n.refine.guidance import GUIDANCES, GuidanceConfig, GuidanceContext, build_guidance, register_guidance
from p2n.refine import multiview as _multiview  # noqa: F401  (registers "multiview")
from p2n.refine.init import INITS, InitError, initial_params, load_generator
from p2n.refine.loop import (
    RefineError,
    RefineResult,
    compare_inits,
    lr_at,
    plot_curve,
    refine,
    refine_object,
    smooth,
    write_outputs,
)
from p2n.refine.target import (
    RefineTarget,
    TargetError,
    from_folder,
    from_image,
    from_prompt,
    from_scene,
    heldout_targets,
)

__all__ = [
    "GUIDANCES", "INITS", "GuidanceConfig", "GuidanceContext", "InitError", "RefineError", "RefineResult",
    "RefineTarget", "TargetError", "build_guidance", "compare_inits", "from_folder", "from_image", "from_prompt",
    "from_scene", "heldout_targets", "initial_params", "load_generator", "lr_at", "plot_curve", "refine",
    "refine_object", "register_guidance", "smooth", "write_outputs",
]
