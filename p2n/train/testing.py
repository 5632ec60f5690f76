"""A tiny configuration and dataset for tests and quick experiments with both training stages.

``tiny_config()`` shrinks the field (13 771 parameters), the views (32 px) and fitting (150 steps) so one object
fits in a few seconds on one CPU thread; ``build_tiny_dataset(out, n)`` fits the first ``n`` single-primitive
objects of the procedural catalogue into a real dataset (``p2n.data`` rows, shards and manifest, no Ray) —
10 objects give 8 training and 2 held-out ones. ``train_tiny_vae`` trains a VAE on it in-process.
Every function reuses what ``out`` already holds, so several test modules can share one build.

Does not own: fitting (``p2n.nerf.fit``), the dataset format (``p2n.data``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from p2n.config import P2NConfig

TINY_OVERRIDES = [
    "field.num_levels=4", "field.log2_hashmap_size=11", "field.base_resolution=8", "field.max_resolution=32",
    "field.hidden_dim=16", "field.geo_feat_dim=7", "field.color_hidden_dim=16",
    "scene.image_size=32", "scene.num_train_views=16", "scene.num_test_views=4", "render.num_samples=32",
    "fit.steps=150", "fit.rays_per_step=1024", "fit.lr=0.03", "fit.target_psnr=null",
    "vae.steps=300", "train.eval_objects=4", "train.eval_views=2", "train.log_every=50",
]


def tiny_config(extra: list[str] | None = None) -> P2NConfig:
    return P2NConfig().override(TINY_OVERRIDES + list(extra or []))


def build_tiny_dataset(out: str | Path, num_objects: int = 10, cfg: P2NConfig | None = None) -> Path:
    """Fit ``num_objects`` single primitives into a dataset at ``out`` (kept when its manifest exists)."""
    from p2n.data.build import fit_object
    from p2n.data.output import write_manifest, write_shard
    from p2n.scenes import catalogue

    out = Path(out)
    if (out / "manifest.json").is_file():
        return out
    cfg = cfg or tiny_config()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for spec in catalogue(cfg.scene, num_objects, include_pairs=False):
            row = fit_object(spec.object_id, cfg)
            if row["status"] != "ok":
                raise RuntimeError(f"tiny dataset: fitting {spec.object_id} failed: {row['error']}")
            write_shard([row], str(out))
        write_manifest(str(out), cfg, complete=True)
    finally:
        torch.set_num_threads(threads)
    return out


def train_tiny_vae(dataset: str | Path, out: str | Path, cfg: P2NConfig | None = None) -> Path:
    """Train a VAE in this process (``train.backend=ddp`` without a process group: a bare module) and export it
    to ``out``; kept when ``out/vae.safetensors`` exists."""
    from p2n.data import open_dataset
    from p2n.train.data import records_from_rows
    from p2n.train.loop import run
    from p2n.train.vae_stage import VAEStage

    out = Path(out)
    if (out / "vae.safetensors").is_file():
        return out
    cfg = (cfg or tiny_config()).override(["train.backend=ddp"])
    records, field = records_from_rows(open_dataset(str(dataset)).rows())
    stage = VAEStage(cfg, [r for r in records if r.split == "train"], [r for r in records if r.split != "train"],
                     field)
    run(stage)
    stage.export(str(out))
    return out


def write_random_generator(out: str | Path, cfg: P2NConfig, mean: torch.Tensor, seed: int = 0,
                           note: str = "") -> Path:
    """A small but real generator checkpoint (``vae.safetensors`` + ``align.safetensors``, what
    ``p2n.generate.Generator.load`` reads) without training: seeded random VAE and aligner weights, with the VAE's
    normalisation mean set to ``mean`` (fitted parameters of one object) and a 1 % std, so every decoded NeRF is
    that object give or take a little — visible, with a surface to mesh."""
    from p2n.align.aligner import Aligner, build_encoders, save_aligner
    from p2n.latent.vae import VAEModel

    out = Path(out)
    torch.manual_seed(seed)
    vae = VAEModel(cfg.vae, cfg.field, mean=mean, std=torch.full_like(mean, 0.01))
    text, image = build_encoders(cfg.align)
    dims = {"text": text.dim, **({"image": image.dim} if image is not None else {})}
    aligner = Aligner(cfg.align, dims, cfg.vae.latent_dim).eval()
    out.mkdir(parents=True, exist_ok=True)
    vae.save(str(out))
    save_aligner(str(out), aligner, torch.zeros(cfg.vae.latent_dim), torch.ones(cfg.vae.latent_dim), vae,
                 info={"note": note})
    return out
