"""Tiny random diffusion models for the guidance tests, built once per session into a temp folder, and one
intra-op thread while these tests run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2n.refine.guidance.tiny import build_tiny_sd, build_tiny_zero123


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny models' ops take microseconds: with several intra-op threads the time goes to thread
    # hand-offs, and on a busy 2-core machine spinning workers made this file 10x slower (8 s vs 120 s).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"), seed=0)


@pytest.fixture(scope="session")
def tiny_zero123_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_zero123(tmp_path_factory.mktemp("tiny-zero123"), seed=0)


@pytest.fixture(scope="session")
def tiny_generator_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small but real generator checkpoint (``align.safetensors`` + ``vae.safetensors``, read by
    ``p2n.generate.Generator.load``): seeded random VAE and aligner weights around the normalisation mean of a NeRF
    briefly fitted to "a green cube" (default field), so every decoded NeRF is that cube give or take 1 % — for a
    green sphere, a start that is roughly right, like a generator's guess for an object it never saw."""
    from p2n.config import P2NConfig
    from p2n.nerf.fit import fit
    from p2n.refine.target import from_scene
    from p2n.train.testing import write_random_generator

    cfg = P2NConfig().override([
        "scene.image_size=24", "scene.num_train_views=12", "scene.num_test_views=2", "render.num_samples=32",
        "render.occupancy_resolution=16", "fit.steps=40", "fit.lr=0.02", "fit.rays_per_step=512",
        "fit.target_psnr=null", "vae.latent_dim=16", "vae.model_dim=32", "vae.depth=1", "vae.heads=2",
        "vae.head_dim=8", "align.model_dim=32", "align.depth=1", "align.heads=2", "align.text_encoder=tiny-clip",
        "align.image_encoder=tiny-clip"])
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mean = fit(from_scene("a green cube", cfg).train, cfg).params
        return write_random_generator(tmp_path_factory.mktemp("generator"), cfg, mean,
                                      note="tests/refine: random weights over a fitted mean")
    finally:
        torch.set_num_threads(saved)
