"""A tiny generator checkpoint built without Ray, and the config overrides that make the whole service fit on a
2-core machine (shared by the Serve tests and usable from a shell: ``python tests/serve/tiny_generator.py DIR``).

The checkpoint is honest, just small: a hash-grid field fitted to one procedural object for a few seconds gives
the VAE's normalisation mean (so every decoded NeRF is a visible object with a surface to mesh), the VAE and the
aligner get seeded random weights, and both are written with the real save functions (``VAEModel.save``,
``save_aligner``), so ``Generator.load(dir)`` reads it like a trained one. Text and images both go through the
``tiny-clip`` encoder (77-token context, so over-long prompts are refused like with a real CLIP).
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import torch

from p2n.config import P2NConfig

FIELD = ["field.num_levels=4", "field.log2_hashmap_size=12", "field.max_resolution=64", "field.hidden_dim=32",
         "field.color_hidden_dim=32"]
SCENE = ["scene.image_size=24", "scene.num_train_views=12", "scene.num_test_views=2", "render.num_samples=32",
         "render.occupancy_resolution=16"]
MODEL = ["vae.latent_dim=16", "vae.model_dim=32", "vae.depth=1", "vae.heads=2", "vae.head_dim=8",
         "align.model_dim=32", "align.depth=1", "align.heads=2", "align.text_encoder=tiny-clip",
         "align.image_encoder=tiny-clip"]
# What the service runs with in tests (passed as the application's `overrides`, like serve/config.yaml would).
SERVICE = SCENE + ["refine.rays_per_step=512", "refine.eval_views=null", "refine.eval_every=5",
                   "serve.job_checkpoint_every=5", "serve.job_lease_s=6", "serve.max_image_bytes=262144",
                   "serve.max_body_bytes=1048576", "serve.max_image_pixels=1048576", "serve.max_refine_steps=400",
                   "serve.health_check_period_s=1", "serve.generator.max_replicas=2",
                   "serve.generator.upscale_delay_s=2", "serve.generator.num_cpus=0.2",
                   "serve.renderer.num_cpus=0.2", "serve.refiner.num_cpus=0.2", "serve.ingress.num_cpus=0.1",
                   "serve.ingress.max_replicas=1", "serve.renderer.max_replicas=1"]


def build_tiny_generator(out: Path, seed: int = 0) -> Path:
    """Write a small generator checkpoint (``align.safetensors`` + ``vae.safetensors``) to ``out``."""
    from p2n.nerf.fit import fit
    from p2n.refine.target import from_scene
    from p2n.train.testing import write_random_generator

    cfg = P2NConfig().override(FIELD + SCENE + MODEL + ["fit.steps=80", "fit.lr=0.03", "fit.rays_per_step=1024",
                                                        f"fit.seed={seed}"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        target = from_scene("a green sphere", cfg)
        mean = fit(target.train, cfg, target.test).params  # a real object: decoded NeRFs render and mesh
        return write_random_generator(out, cfg, mean, seed, note="tests/serve: random weights over a fitted mean")
    finally:
        torch.set_num_threads(threads)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    print(build_tiny_generator(Path(sys.argv[1])))
