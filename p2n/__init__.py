"""p2n — Prompt2NeRF-PIL: a text prompt or an image becomes a NeRF in one forward pass.

The public verbs (imported lazily, so ``import p2n`` stays cheap):

    fit(train_views, cfg, test_views)        one object's NeRF from the shared initialization  (p2n.nerf.fit)
    encode(vae, params) / decode(vae, z)     the pretrained implicit latent                     (p2n.latent)
    Generator.load(ckpt).from_prompts([...]) prompts → NeRF parameters in one forward pass       (p2n.generate)
    refine_object(init, guidance, target, cfg, steps, out_dir)                                  (p2n.refine)
    render_image(field, params, cameras, render_cfg)                                            (p2n.nerf.render)
    save_turntable / save_mesh                                                                  (p2n.export)

``p2n`` never imports Ray: the Ray adapters live in ``ray_jobs/`` and ``serve/``.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_LAZY = {
    "P2NConfig": "p2n.config",
    "load_config": "p2n.config",
    "fit": "p2n.nerf.fit",
    "encode": "p2n.latent",
    "decode": "p2n.latent",
    "interpolate": "p2n.latent",
    "Generator": "p2n.generate",
    "refine_object": "p2n.refine",
    "render_image": "p2n.nerf.render",
    "save_turntable": "p2n.export",
    "save_mesh": "p2n.export",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'p2n' has no attribute {name!r}")
