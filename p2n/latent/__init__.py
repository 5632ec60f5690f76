"""Stage 1, the pretrained implicit latent: a VAE over flattened NeRF parameter vectors.

    from p2n.latent import load_vae, encode, decode, interpolate
    vae = load_vae("runs/vae")                 # the --out of `p2n train vae` (or its vae.safetensors)
    z = encode(vae, params)                    # [B, P] -> [B, L]  (== vae.encode(params))
    params = decode(vae, z)                    # [B, L] -> [B, P]  (== vae.decode(z))
    path = interpolate(z[0], z[1], torch.linspace(0, 1, 5))   # [5, L]

Does not own: training (``p2n.train``).
"""

from __future__ import annotations

from torch import Tensor

from p2n.latent.checkpoint import CheckpointError, WrongCheckpointKind
from p2n.latent.tokens import ParamTokenizer, segments
from p2n.latent.vae import ParamVAE, VAEModel, interpolate, load_vae, normalisation_stats


def encode(vae: VAEModel, params: Tensor) -> Tensor:
    """Posterior means of parameter vectors: ``[B, P]`` (or ``[P]``) -> ``[B, L]`` (or ``[L]``)."""
    return vae.encode(params)


def decode(vae: VAEModel, z: Tensor) -> Tensor:
    """Parameter vectors of latents: ``[B, L]`` (or ``[L]``) -> ``[B, P]`` (or ``[P]``)."""
    return vae.decode(z)


__all__ = [
    "CheckpointError", "ParamTokenizer", "ParamVAE", "VAEModel", "WrongCheckpointKind", "decode", "encode",
    "interpolate", "load_vae", "normalisation_stats", "segments",
]
