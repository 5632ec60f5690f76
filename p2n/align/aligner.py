"""Stage 2: the aligner — a small transformer from a prompt embedding (text or image) to the VAE latent.

An embedding from a frozen encoder (``build_encoder``: ``minilm``/``openclip`` text, ``tiny-clip``/``openclip``
images) goes through its modality's own input projection into ``align.num_tokens`` tokens (plus a modality
embedding), a transformer, and a head that predicts the VAE posterior mean in *standardised* latent units
(``(mu - latent_mean) / latent_std`` over the training objects, stored in the file), so the regression loss is
1.0 for the "always predict the mean object" baseline whatever the VAE's latent scale.

    from p2n.align import load_aligner
    bundle = load_aligner("runs/align")           # the --out of `p2n train align`; holds a copy of the VAE
    z = bundle.latents_from_text(["a red cube"])  # [1, L]
    params = bundle.vae.decode(z)                 # [1, P] -> p2n.nerf.render.render_image(...)
    z_img = bundle.latents_from_images(images)    # images: [B, H, W, 3] in [0, 1]

``align.safetensors`` carries kind ``p2n.align``, the aligner and encoder specs, the latent statistics and the
VAE's layout hash; ``vae.safetensors`` sits beside it, so one folder is enough to generate.

Does not own: the encoders (``encoders.py``), the VAE (``p2n.latent``), training (``p2n.train``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from p2n.align.encoders import PromptEncoder, build_encoder
from p2n.config import AlignConfig
from p2n.latent.checkpoint import CheckpointError, load_file, resolve, save_file
from p2n.latent.vae import FILENAME as VAE_FILENAME
from p2n.latent.vae import VAEModel, load_vae

KIND = "p2n.align"
FILENAME = "align.safetensors"
MODALITIES = ("text", "image")


class Aligner(nn.Module):
    """``{modality: embeddings [B_m, D_m]}`` -> ``{modality: standardised latents [B_m, L]}`` in one pass."""

    def __init__(self, cfg: AlignConfig, input_dims: dict[str, int], latent_dim: int):
        super().__init__()
        unknown = set(input_dims) - set(MODALITIES)
        if unknown or not input_dims:
            raise ValueError(f"aligner modalities must be among {MODALITIES}, got {sorted(input_dims)}")
        if cfg.model_dim % cfg.heads:
            raise ValueError(f"align.model_dim={cfg.model_dim} must be divisible by align.heads={cfg.heads}")
        self.cfg, self.input_dims, self.latent_dim = cfg, dict(input_dims), latent_dim
        t, d = cfg.num_tokens, cfg.model_dim
        self.inputs = nn.ModuleDict({m: nn.Linear(dim, t * d) for m, dim in input_dims.items()})
        self.modality = nn.ParameterDict({m: nn.Parameter(torch.randn(1, 1, d) * 0.02) for m in input_dims})
        self.pos = nn.Parameter(torch.randn(t, d) * 0.02)
        if cfg.depth > 0:
            layer = nn.TransformerEncoderLayer(d, cfg.heads, 4 * d, dropout=cfg.dropout, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.blocks: nn.Module = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        else:
            self.blocks = nn.Identity()
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, latent_dim)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.input_dims)

    def forward(self, inputs: dict[str, Tensor]) -> dict[str, Tensor]:
        toks, sizes = [], []
        for m, x in inputs.items():
            if m not in self.inputs:
                raise ValueError(f"this aligner has no {m!r} input (it was trained with {self.modalities})")
            # Encoders return unit vectors; scale to unit variance per coordinate.
            h = self.inputs[m](x * math.sqrt(x.shape[-1])).reshape(x.shape[0], self.cfg.num_tokens, -1)
            toks.append(h + self.pos + self.modality[m])
            sizes.append(x.shape[0])
        h = self.blocks(torch.cat(toks, 0))
        out = self.head(self.norm(h.mean(1)))
        return dict(zip(inputs.keys(), out.split(sizes, 0)))


@dataclass
class AlignerBundle:
    """Everything generation needs: the aligner, its encoders, the latent statistics and the VAE."""

    aligner: Aligner
    text_encoder: PromptEncoder | None
    image_encoder: PromptEncoder | None
    vae: VAEModel
    latent_mean: Tensor  # [L]
    latent_std: Tensor  # [L]
    cfg: AlignConfig
    info: dict[str, Any]

    def __iter__(self):  # ``aligner, encoders, vae = load_aligner(uri)``
        return iter((self.aligner, {"text": self.text_encoder, "image": self.image_encoder}, self.vae))

    def to_latent(self, standardised: Tensor) -> Tensor:
        return standardised * self.latent_std + self.latent_mean

    @torch.no_grad()
    def latents_from_embeddings(self, embeddings: Tensor, modality: str) -> Tensor:
        """Embeddings ``[B, D]`` of one modality -> VAE latents ``[B, L]``."""
        out = self.aligner({modality: embeddings.to(self.latent_mean)})[modality]
        return self.to_latent(out)

    @torch.no_grad()
    def latents_from_text(self, prompts: Sequence[str], validated: bool = False) -> Tensor:
        """Prompts -> VAE latents ``[B, L]`` (decode with ``self.vae.decode``). ``validated``: the prompts come
        from the text encoder's ``validate_prompts`` already, so they are not checked twice."""
        if self.text_encoder is None:
            raise CheckpointError("this aligner was loaded without its text encoder (build_encoders=False)")
        return self.latents_from_embeddings(self.text_encoder.encode_text(list(prompts), validated), "text")

    @torch.no_grad()
    def latents_from_images(self, images: Tensor | Sequence[Any]) -> Tensor:
        """Images (``[B, H, W, 3]`` in [0, 1], or PIL images) -> VAE latents ``[B, L]``."""
        if self.image_encoder is None:
            from p2n.align.errors import ImagesNotSupported

            raise ImagesNotSupported(f"this aligner has no image encoder (align.image_encoder was "
                                     f"{self.cfg.image_encoder!r} at training); retrain with one, e.g. tiny-clip "
                                     "or openclip:ViT-B-32:/path")
        return self.latents_from_embeddings(self.image_encoder.encode_image(images), "image")

    @torch.no_grad()
    def params_from_text(self, prompts: Sequence[str]) -> Tensor:
        return self.vae.decode(self.latents_from_text(prompts))

    @torch.no_grad()
    def params_from_images(self, images: Tensor | Sequence[Any]) -> Tensor:
        return self.vae.decode(self.latents_from_images(images))

    @torch.no_grad()
    def mean_params(self) -> Tensor:
        """The parameters of the mean training latent: the "no prompt" baseline."""
        return self.vae.decode(self.latent_mean)


def build_encoders(cfg: AlignConfig, device: str | torch.device = "cpu"
                   ) -> tuple[PromptEncoder, PromptEncoder | None]:
    """The text encoder and the image encoder (None when ``image_encoder`` is unset); built once when equal."""
    text = build_encoder(cfg.text_encoder, device)
    if not cfg.image_encoder:
        return text, None
    image = text if cfg.image_encoder == cfg.text_encoder else build_encoder(cfg.image_encoder, device)
    if not image.supports_images:
        from p2n.align.errors import ImagesNotSupported

        raise ImagesNotSupported(f"align.image_encoder={cfg.image_encoder!r} cannot encode images; use tiny-clip or "
                                 "openclip:<model>:<weights>, or set align.image_encoder to null")
    return text, image


def save_aligner(uri: str, aligner: Aligner, latent_mean: Tensor, latent_std: Tensor, vae: VAEModel,
                 info: dict[str, Any] | None = None, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``align.safetensors`` (``uri``: the output folder, or a ``.safetensors`` path). The VAE is recorded
    by layout hash and weight fingerprint; copy its ``vae.safetensors`` beside the file (``export`` does)."""
    vae_layout_hash, vae_fingerprint = vae.layout_hash, vae.fingerprint()
    tensors = {f"aligner.{k}": v.detach().float().cpu() for k, v in aligner.state_dict().items()}
    tensors["latent_mean"] = latent_mean.detach().float().cpu()
    tensors["latent_std"] = latent_std.detach().float().cpu()
    meta = {
        "align": asdict(aligner.cfg),
        "input_dims": aligner.input_dims,
        "latent_dim": aligner.latent_dim,
        "text_encoder": aligner.cfg.text_encoder,
        "image_encoder": aligner.cfg.image_encoder or "",
        "vae": VAE_FILENAME,  # relative to this file's folder
        "vae_layout_hash": vae_layout_hash,
        "vae_fingerprint": vae_fingerprint,
        "info": info or {},
    }
    return save_file(resolve(uri, FILENAME), tensors, KIND, meta, storage_options)


def aligner_from_tensors(tensors: dict[str, Tensor], meta: dict[str, str], source: str = "aligner"
                         ) -> tuple[Aligner, Tensor, Tensor, dict[str, Any]]:
    try:
        cfg = AlignConfig(**json.loads(meta["align"]))
        dims = {k: int(v) for k, v in json.loads(meta["input_dims"]).items()}
        latent_dim = int(meta["latent_dim"])
        info = json.loads(meta.get("info", "{}"))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: unreadable aligner metadata ({type(e).__name__}: {e})") from None
    aligner = Aligner(cfg, dims, latent_dim)
    state = {k[len("aligner."):]: v for k, v in tensors.items() if k.startswith("aligner.")}
    missing, unexpected = aligner.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{source}: weights do not match the recorded aligner config (missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]})")
    info = {**info, "vae_layout_hash": meta.get("vae_layout_hash"), "vae_fingerprint": meta.get("vae_fingerprint"),
            "vae": meta.get("vae", VAE_FILENAME)}
    return aligner.eval(), tensors["latent_mean"], tensors["latent_std"], info


def load_aligner(uri: str, storage_options: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                 with_encoders: bool = True, vae_uri: str | None = None) -> AlignerBundle:
    """Load a trained aligner from its ``--out`` folder (``align.safetensors`` + ``vae.safetensors``).

    ``vae_uri`` overrides where the VAE is read from (default: beside the aligner file). ``with_encoders=False``
    skips building the prompt encoders (e.g. to inspect weights without open_clip / sentence-transformers)."""
    path = resolve(uri, FILENAME)
    tensors, meta = load_file(path, KIND, storage_options)
    aligner, mean, std, info = aligner_from_tensors(tensors, meta, path)
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    vae = load_vae(vae_uri or f"{folder}/{info['vae']}", storage_options, device)
    if vae.latent_dim != aligner.latent_dim or vae.fingerprint() != info.get("vae_fingerprint"):
        raise CheckpointError(f"{path}: the VAE at {vae_uri or folder + '/' + info['vae']} (layout "
                              f"{vae.layout_hash}, fingerprint {vae.fingerprint()}) is not the one this aligner was "
                              f"trained against (layout {info.get('vae_layout_hash')}, fingerprint "
                              f"{info.get('vae_fingerprint')}); pass the VAE it was trained with")
    text = image = None
    if with_encoders:
        text, image = build_encoders(aligner.cfg, device)
        for name, enc in (("text", text), ("image", image)):
            if enc is not None and name in aligner.input_dims and enc.dim != aligner.input_dims[name]:
                raise CheckpointError(f"{path}: the {name} encoder {enc.name} gives {enc.dim}-d embeddings, the "
                                      f"aligner was trained on {aligner.input_dims[name]}-d ones")
    return AlignerBundle(aligner.to(device), text, image, vae, mean.to(device), std.to(device), aligner.cfg, info)
