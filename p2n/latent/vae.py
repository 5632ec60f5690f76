"""Stage 1: a VAE over flattened NeRF parameter vectors — the "pretrained implicit latent" of Prompt2NeRF-PIL.

Every object's parameters were fitted from one shared initialization, so coordinate ``i`` means the same thing in
every vector and the vectors can be modelled like any other data. The model:

* **normalisation** per coordinate with the training set's mean and std (std floored at ``vae.std_floor``);
  stored in the model file, applied inside :class:`VAEModel` so callers only ever see real parameters;
* **tokens** per layer / per hash-grid level (``tokens.py``): ``[B, P] -> [B, K, C]``;
* **encoder**: one linear map per token (``C -> head_dim``, a grouped linear: ``P * head_dim`` weights in all),
  a shared projection to ``model_dim``, a transformer over the K tokens, and the mean over tokens gives the
  posterior mean and log-variance of a ``latent_dim`` latent;
* **decoder**: the latent broadcast onto K learned token positions, a transformer, a shared projection to
  ``head_dim`` and one linear map per token back to its ``C`` values.

The only parts whose size grows with the parameter count are the two grouped linears (``2 * P * head_dim``
weights), so the same design runs from tens of thousands of parameters (CPU tests) to millions (lower
``head_dim``, raise ``chunk_size`` to bound the token count); no dense ``P x hidden`` layer exists.

Measured on 2 CPU cores (decoded-vs-fitted render PSNR gap on the training objects):

* ``depth=0`` (the default: chunked linear encoder, per-token MLP decoder) learns far faster than a transformer
  over the tokens: 17 objects of a 13.8 k-parameter field, 600 steps: gap 0.0 dB (depth 0) vs 1.6 dB (depth 1);
  param MSE 1e-5 vs 0.016. Hence ``depth`` defaults to 0; the transformer stays available.
* the log-variance starts at log(0.01): with the usual 0 the posterior noise hides the signal and the decoder
  collapses to the mean object for hundreds of steps.
* the render term (``vae.render_weight``) helps when training is short (150 steps: gap 8.0 -> 5.9 -> 4.4 dB for
  weights 0 / 1 / 10) and at 600 steps pushes decoded renders *above* the fitted ones (gap -0.8 / -2.8 dB) —
  but it trains on the dataset's stored views, which are also the evaluation views, and costs 2-3x per step.
  Parameter reconstruction alone reaches a ~0 dB gap (0.0 dB at 600 steps there; 0.05 dB mean over the 21
  training objects of the 32-object demo dataset, 229 k parameters, 300 steps), so it defaults to 0.

:class:`ParamVAE` is the trainable ``nn.Module`` in normalised space (what DeepSpeed/DDP wrap);
:class:`VAEModel` adds the normalisation, the field config and file I/O, and is what everything else uses:
``encode(params) -> mu``, ``decode(z) -> params``, ``interpolate(z0, z1, t)``, ``save``/``load_vae``.

Does not own: training (``p2n.train``), rendering (``p2n.nerf.render``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from p2n.config import FieldConfig, VAEConfig
from p2n.latent.checkpoint import CheckpointError, load_file, resolve, save_file
from p2n.latent.tokens import ParamTokenizer
from p2n.nerf.params import ParamsError

KIND = "p2n.vae"
LOGVAR_INIT = -4.6  # log(0.01)
FILENAME = "vae.safetensors"


class GroupedLinear(nn.Module):
    """K independent linear maps, one per token: ``[B, K, n_in] -> [B, K, n_out]``."""

    def __init__(self, k: int, n_in: int, n_out: int, zero_init: bool = False):
        super().__init__()
        bound = 1.0 / math.sqrt(n_in)
        w = torch.zeros(k, n_in, n_out) if zero_init else torch.empty(k, n_in, n_out).uniform_(-bound, bound)
        self.weight = nn.Parameter(w)
        self.bias = nn.Parameter(torch.zeros(k, n_out))

    def forward(self, x: Tensor) -> Tensor:
        return torch.einsum("bki,kio->bko", x, self.weight) + self.bias


def _copy_plan(scatter_index: Tensor, chunk: int) -> list[tuple[int, int, int, int, bool]]:
    """How to assemble ``[B, P]`` from tokens ``[K, B, C]`` with few copies: ``(p, k, offset, n, full)`` ops,
    ``full`` meaning n whole tokens k.. land at p, else n values of token k from ``offset`` on."""
    si = scatter_index.tolist()
    plan: list[tuple[int, int, int, int, bool]] = []
    p = 0
    while p < len(si):
        end = p + 1  # a run: consecutive parameters in consecutive token slots
        while end < len(si) and si[end] == si[end - 1] + 1:
            end += 1
        while p < end:
            k, offset = divmod(si[p], chunk)
            whole = (end - p) // chunk if offset == 0 else 0
            if whole:
                plan.append((p, k, 0, whole, True))
                p += whole * chunk
            else:
                n = min(end - p, chunk - offset)
                plan.append((p, k, offset, n, False))
                p += n
    return plan


def _transformer(dim: int, heads: int, depth: int) -> nn.Module:
    if depth <= 0:
        return nn.Identity()
    layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=4 * dim, dropout=0.0, activation="gelu",
                                       batch_first=True, norm_first=True)
    return nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)


class ParamVAE(nn.Module):
    """The VAE in normalised parameter space: ``x [B, P] -> (mu, logvar) [B, L]``, ``z [B, L] -> x [B, P]``."""

    def __init__(self, cfg: VAEConfig, field: FieldConfig):
        super().__init__()
        if cfg.model_dim % cfg.heads:
            raise ValueError(f"vae.model_dim={cfg.model_dim} must be divisible by vae.heads={cfg.heads}")
        self.cfg, self.field = cfg, field
        self.tokenizer = ParamTokenizer(field, cfg.chunk_size)
        k, c, h, d, latent = self.tokenizer.num_tokens, cfg.chunk_size, cfg.head_dim, cfg.model_dim, cfg.latent_dim
        self.register_buffer("gather_index", self.tokenizer.gather_index.clone(), persistent=False)
        self.register_buffer("scatter_index", self.tokenizer.scatter_index.clone(), persistent=False)
        # encoder
        self.enc_in = GroupedLinear(k, c, h)
        self.enc_proj = nn.Linear(h, d)
        self.enc_pos = nn.Parameter(torch.randn(k, d) * 0.02)
        self.encoder = _transformer(d, cfg.heads, cfg.depth)
        self.enc_norm = nn.LayerNorm(d)
        self.to_posterior = nn.Linear(d, 2 * latent)
        with torch.no_grad():  # start with a narrow posterior (sigma ~ 0.1): early noise otherwise drowns the signal
            self.to_posterior.bias[latent:] = LOGVAR_INIT
        # decoder
        self.dec_in = nn.Linear(latent, d)
        self.dec_pos = nn.Parameter(torch.randn(k, d) * 0.02)
        self.decoder = _transformer(d, cfg.heads, cfg.depth)
        self.dec_norm = nn.LayerNorm(d)
        self.dec_proj = nn.Linear(d, h)
        self.dec_out = GroupedLinear(k, h, c)
        self.copy_plan = _copy_plan(self.tokenizer.scatter_index, c)

    @property
    def num_params(self) -> int:
        return self.tokenizer.num_params

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Normalised parameters ``[B, P]`` -> posterior mean and log-variance ``[B, L]`` each."""
        padded = torch.cat([x, x.new_zeros(x.shape[0], 1)], -1)
        tok = padded[:, self.gather_index]  # [B, K, C]
        h = self.enc_proj(torch.nn.functional.gelu(self.enc_in(tok))) + self.enc_pos
        h = self.enc_norm(self.encoder(h).mean(1))  # mean over tokens: with depth 0 a chunked linear encoder
        mu, logvar = self.to_posterior(h).chunk(2, -1)
        return mu, logvar.clamp(-12.0, 6.0)

    def decode(self, z: Tensor, scale: Tensor | None = None, shift: Tensor | None = None,
               folded: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Latents ``[B, L]`` -> normalised parameters ``[B, P]``, or ``x * scale + shift`` when both are given.
        ``folded``: the output layer with ``scale``/``shift`` already inside (:meth:`fold_output`), used when no
        gradient flows (nothing here requires one, or grad mode is off)."""
        h = self.dec_in(z)[:, None, :] + self.dec_pos  # [B, K, D]
        h = self.dec_norm(self.decoder(h))
        g = torch.nn.functional.gelu(self.dec_proj(h))  # [B, K, H]
        if g.requires_grad:
            # index_select, not tok[:, index]: ~3x faster at batch 32
            x = torch.index_select(self.dec_out(g).reshape(z.shape[0], -1), 1, self.scatter_index)
            return x if scale is None else torch.addcmul(shift, x, scale)
        if folded is not None:
            return self._decode_inference(g, *folded)
        out = self._decode_inference(g, self.dec_out.weight, self.dec_out.bias)
        return out if scale is None else out.mul_(scale).add_(shift)

    def fold_output(self, scale: Tensor, shift: Tensor) -> tuple[Tensor, Tensor]:
        """The output layer's weight ``[K, H, C]`` and bias ``[K, C]`` with ``x * scale + shift`` folded in, so an
        inference decode needs no pass over ``[B, P]`` after the matmul. Slots that hold no parameter (the last
        token's padding) keep scale 1 and shift 0; they are never copied out."""
        k, _, c = self.dec_out.weight.shape
        slot_scale = scale.new_ones(k * c).index_copy_(0, self.scatter_index, scale).view(k, c)
        slot_shift = shift.new_zeros(k * c).index_copy_(0, self.scatter_index, shift).view(k, c)
        with torch.no_grad():
            weight = (self.dec_out.weight * slot_scale[:, None, :]).contiguous()
            bias = torch.addcmul(slot_shift, self.dec_out.bias, slot_scale).contiguous()
        return weight, bias

    def _decode_inference(self, g: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
        """The autograd path's values with fewer passes over memory. Batched decoding on a CPU is memory-bound
        (32 parameter vectors are ~30 MB), so every [B, P]-sized pass costs as much as the arithmetic: one
        ``bmm`` writes every token ([K, B, C]); the bias is added while contiguous runs of tokens are written
        into the output (``baddbmm`` would first copy the broadcast bias over all of [K, B, C], which alone
        took longer than the matmul). 2 cores, batch 32: 29.5 -> 7.8 -> 5.3 ms."""
        b = g.shape[0]
        tok = torch.bmm(g.transpose(0, 1), weight)  # [K, B, C]
        c = tok.shape[-1]
        out = tok.new_empty(b, self.num_params)
        for p, k, offset, n, full in self.copy_plan:
            if full:  # n whole tokens from k on
                torch.add(tok[k:k + n].transpose(0, 1), bias[k:k + n], out=out[:, p:p + n * c].view(b, n, c))
            else:  # n values of token k from offset on
                torch.add(tok[k, :, offset:offset + n], bias[k, offset:offset + n], out=out[:, p:p + n])
        return out

    def forward(self, x: Tensor, eps: Tensor | None = None) -> dict[str, Tensor]:
        """Encode, sample ``z = mu + exp(logvar / 2) * eps`` (``eps=None``: z = mu) and decode."""
        mu, logvar = self.encode(x)
        z = mu if eps is None else mu + torch.exp(0.5 * logvar) * eps.to(mu.dtype)
        return {"recon": self.decode(z), "mu": mu, "logvar": logvar, "z": z}


def normalisation_stats(params: Tensor, std_floor: float) -> tuple[Tensor, Tensor]:
    """Per-coordinate mean and floored std of a stack of parameter vectors ``[N, P]`` (float64 sums)."""
    x = params.double()
    mean = x.mean(0)
    std = (x.var(0, unbiased=False)).clamp(min=0).sqrt().clamp(min=std_floor)
    return mean.float(), std.float()


class VAEModel(nn.Module):
    """A trained VAE with its normalisation: works in real parameter space. See the module docstring."""

    def __init__(self, cfg: VAEConfig, field: FieldConfig, mean: Tensor | None = None, std: Tensor | None = None,
                 info: dict[str, Any] | None = None):
        super().__init__()
        self.cfg, self.field = cfg, field
        self.net = ParamVAE(cfg, field)
        p = self.net.num_params
        self.register_buffer("mean", torch.zeros(p) if mean is None else mean.detach().float().clone())
        self.register_buffer("std", torch.ones(p) if std is None else std.detach().float().clone())
        if self.mean.shape != (p,) or self.std.shape != (p,):
            raise ValueError(f"normalisation stats have shapes {tuple(self.mean.shape)}/{tuple(self.std.shape)}, "
                             f"the field has {p} parameters")
        self.info: dict[str, Any] = dict(info or {})  # training provenance: steps, dataset, metrics
        # freeze(): the output layer with the denormalisation inside; buffers so .to(device) moves them, not
        # persistent so files and fingerprints hold only the trained weights
        self.register_buffer("folded_weight", None, persistent=False)
        self.register_buffer("folded_bias", None, persistent=False)

    # ---- properties -----------------------------------------------------------------------------------------
    @property
    def latent_dim(self) -> int:
        return self.cfg.latent_dim

    @property
    def num_params(self) -> int:
        return self.net.num_params

    @property
    def layout_hash(self) -> str:
        return self.field.layout_hash()

    @property
    def device(self) -> torch.device:
        return self.mean.device

    # ---- normalisation --------------------------------------------------------------------------------------
    def normalize(self, params: Tensor) -> Tensor:
        return (params.to(self.mean) - self.mean) / self.std

    def denormalize(self, x: Tensor) -> Tensor:
        return torch.addcmul(self.mean, x.to(self.mean), self.std)  # one pass over [B, P], not two

    def set_stats(self, mean: Tensor, std: Tensor) -> None:
        self.mean.copy_(mean)
        self.std.copy_(std)
        self.folded_weight = self.folded_bias = None

    def freeze(self) -> "VAEModel":
        """For a model that will only decode from now on (a loaded generator): eval mode, no gradients, and the
        denormalisation folded into the output layer (one extra copy of its ``P x head_dim`` weights), which takes
        two passes over ``[B, P]`` off every decode: 2 cores, batch 32, 7.9 -> 5.3 ms with the fused bias.
        Training the model again (``train()``, ``set_stats``) drops the folded copy."""
        self.eval()
        self.requires_grad_(False)
        self.folded_weight, self.folded_bias = self.net.fold_output(self.std, self.mean)
        return self

    def train(self, mode: bool = True) -> "VAEModel":
        if mode:
            self.folded_weight = self.folded_bias = None
        return super().train(mode)

    # ---- the verbs ------------------------------------------------------------------------------------------
    def encode(self, params: Tensor, return_logvar: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Parameter vectors ``[B, P]`` (or ``[P]``) -> posterior means ``[B, L]`` (or ``[L]``)."""
        single = params.ndim == 1
        x = params[None] if single else params
        if x.shape[-1] != self.num_params:
            raise ParamsError(f"parameter vectors have {x.shape[-1]} values; this VAE was trained on a field with "
                              f"{self.num_params} (layout {self.layout_hash})")
        mu, logvar = self.net.encode(self.normalize(x))
        if single:
            mu, logvar = mu[0], logvar[0]
        return (mu, logvar) if return_logvar else mu

    def decode(self, z: Tensor) -> Tensor:
        """Latents ``[B, L]`` (or ``[L]``) -> parameter vectors ``[B, P]`` (or ``[P]``), float32."""
        single = z.ndim == 1
        zz = z[None] if single else z
        if zz.shape[-1] != self.latent_dim:
            raise ValueError(f"latents have {zz.shape[-1]} dims; this VAE's latent has {self.latent_dim}")
        folded = None
        if self.folded_weight is not None:  # frozen: no weight takes a gradient; decode() uses it only without one
            folded = (self.folded_weight, self.folded_bias)
        out = self.net.decode(zz.to(self.mean), self.std, self.mean, folded)  # denormalised: x * std + mean
        return out[0] if single else out

    def reconstruct(self, params: Tensor) -> Tensor:
        """``decode(encode(params))``."""
        return self.decode(self.encode(params))

    @staticmethod
    def interpolate(z0: Tensor, z1: Tensor, t: float | Tensor, mode: str = "linear") -> Tensor:
        return interpolate(z0, z1, t, mode)

    # ---- files ----------------------------------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        return {
            "vae": asdict(self.cfg),
            "field": asdict(self.field),
            "layout_hash": self.layout_hash,
            "latent_dim": self.latent_dim,
            "num_params": self.num_params,
            "normalisation": "per-coordinate (params - mean) / std; tensors 'mean' and 'std'",
            "info": self.info,
        }

    def fingerprint(self) -> str:
        """A short hash of the weights and statistics: tells two VAEs apart even on the same layout."""
        import hashlib

        h = hashlib.sha256()
        for k, v in sorted(self.tensors().items()):
            h.update(k.encode())
            h.update(v.contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    def tensors(self) -> dict[str, Tensor]:
        return {k: v.detach().float().cpu() for k, v in self.state_dict().items()}

    def save(self, uri: str, storage_options: dict[str, Any] | None = None) -> str:
        """Write ``vae.safetensors`` (``uri`` a folder, or a ``.safetensors`` path); returns the file's URI."""
        return save_file(resolve(uri, FILENAME), self.tensors(), KIND, self.metadata(), storage_options)

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict[str, str], source: str = "vae") -> "VAEModel":
        try:
            cfg = VAEConfig(**json.loads(meta["vae"]))
            field = FieldConfig(**json.loads(meta["field"]))
            info = json.loads(meta.get("info", "{}"))
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: unreadable VAE metadata ({type(e).__name__}: {e})") from None
        if field.layout_hash() != meta.get("layout_hash"):
            raise CheckpointError(f"{source}: field config and recorded layout hash disagree")
        model = cls(cfg, field, info=info)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{source}: weights do not match the recorded VAE config (missing {missing[:4]}, "
                                  f"unexpected {unexpected[:4]})")
        return model.eval()


def load_vae(uri: str, storage_options: dict[str, Any] | None = None, device: str | torch.device = "cpu",
             expected_field: FieldConfig | None = None) -> VAEModel:
    """Load a trained VAE from its ``--out`` folder (or the ``vae.safetensors`` file itself), in eval mode."""
    path = resolve(uri, FILENAME)
    tensors, meta = load_file(path, KIND, storage_options)
    model = VAEModel.from_tensors(tensors, meta, path)
    if expected_field is not None and expected_field.layout_hash() != model.layout_hash:
        raise ParamsError(f"{path}: the VAE was trained on field layout {model.layout_hash}, the data here has "
                          f"{expected_field.layout_hash()}; use the VAE trained on this dataset")
    return model.to(device)


def interpolate(z0: Tensor, z1: Tensor, t: float | Tensor, mode: str = "linear") -> Tensor:
    """Points between latents ``z0`` and ``z1`` (``[..., L]``, broadcastable).

    ``t`` a float gives ``[..., L]``; ``t`` a 1-D tensor of T values gives ``[..., T, L]``. ``mode``: ``linear``
    (straight line, what the VAE's Gaussian posterior means suggest) or ``slerp`` (keeps the norm).
    """
    scalar = not torch.is_tensor(t) or t.ndim == 0
    tt = torch.as_tensor(t, dtype=z0.dtype, device=z0.device).reshape(-1)
    a, b = z0.unsqueeze(-2), z1.unsqueeze(-2)  # [..., 1, L]
    w = tt[:, None]  # [T, 1]
    if mode == "linear":
        out = a + (b - a) * w
    elif mode == "slerp":
        na, nb = a.norm(dim=-1, keepdim=True).clamp(min=1e-8), b.norm(dim=-1, keepdim=True).clamp(min=1e-8)
        cos = ((a / na) * (b / nb)).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7)
        omega = torch.arccos(cos)
        so = torch.sin(omega)
        out = (torch.sin((1 - w) * omega) / so) * a + (torch.sin(w * omega) / so) * b
    else:
        raise ValueError(f"interpolation mode {mode!r}: use 'linear' or 'slerp'")
    return out.squeeze(-2) if scalar else out
