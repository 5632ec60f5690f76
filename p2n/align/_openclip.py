"""open_clip encoders: `openclip:<model>:<weights>` (production) and `tiny-clip[:<seed>]` (tests, CPU demo).

Loading never touches the network. A pretrained tag is resolved to a file in the local caches open_clip uses
(the Hugging Face hub cache for `hf_hub` tags, `~/.cache/clip` for URL tags) with `local_files_only`, and the
build runs with huggingface_hub's offline switch on; a missing file raises EncoderWeightsMissing saying how to
bring the weights here. A local file (.safetensors, or a torch .bin/.pt/.pth loaded with weights_only=True, which
is open_clip's default, so nothing is unpickled beyond tensors) is loaded as given.

Does not own: prompt/image validation and preprocessing (`encoders.py`), the torchvision workaround
(`_torchvision_compat.py`).
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from p2n.align._offline import hf_cache_dir, hub_offline
from p2n.align._torchvision_compat import ensure_torchvision_importable
from p2n.align.encoders import PromptEncoder
from p2n.align.errors import EncoderError, EncoderWeightsMissing, UnknownEncoder

# tiny-clip: ~3.4 M parameters, 3.2 M of them the 49408 x 64 token embedding open_clip's BPE vocabulary needs.
TINY_CLIP_CFG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "patch_size": 8, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".npz")


def _import_open_clip() -> Any:
    ensure_torchvision_importable()  # open_clip imports torchvision.transforms at import time
    import open_clip

    return open_clip


class OpenClipEncoder(PromptEncoder):
    """Any open_clip CLIP-style model with its tokenizer; text and images share one embedding space."""

    supports_images = True

    def __init__(self, name: str, model: torch.nn.Module, tokenizer: Any, device: torch.device) -> None:
        open_clip = _import_open_clip()
        self.name = name
        self.device = device
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.context_length = int(tokenizer.context_length)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        size = pp.get("size", 224)
        self.image_size = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        self.image_mean = tuple(float(v) for v in pp.get("mean", self.image_mean))
        self.image_std = tuple(float(v) for v in pp.get("std", self.image_std))
        self.image_interpolation = str(pp.get("interpolation", "bicubic"))
        self.image_resize_mode = str(pp.get("resize_mode", "shortest"))
        with torch.no_grad():  # the embedding size, whatever the projection type of this architecture
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(device)).shape[-1])

    def count_tokens(self, text: str) -> int:
        tok = self.tokenizer
        if hasattr(tok, "encode") and hasattr(tok, "sot_token_id"):  # open_clip's BPE SimpleTokenizer
            return len(tok.encode(text)) + 2  # + start/end of text
        inner = getattr(tok, "tokenizer", None)  # HFTokenizer / SigLipTokenizer wrap a transformers tokenizer
        if inner is not None:
            clean = getattr(tok, "clean_fn", lambda s: s)(text)
            return len(inner(clean, add_special_tokens=True, verbose=False)["input_ids"])
        raise EncoderError(f"cannot count tokens with {type(tok).__name__} for {self.name}")

    def _encode_text(self, prompts: list[str]) -> Tensor:
        return self.model.encode_text(self.tokenizer(prompts).to(self.device))

    def _encode_image(self, pixels: Tensor) -> Tensor:
        return self.model.encode_image(pixels)


# ---- tiny-clip -----------------------------------------------------------------------------------------------
def build_tiny_clip(seed: int, device: torch.device) -> OpenClipEncoder:
    """A small CLIP with weights drawn from `seed` on the CPU (identical on every machine), then moved."""
    open_clip = _import_open_clip()
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG stream
        torch.manual_seed(seed)
        model = open_clip.CLIP(**TINY_CLIP_CFG)
    pp = {"size": TINY_CLIP_CFG["vision_cfg"]["image_size"], "mode": "RGB", "mean": open_clip.OPENAI_DATASET_MEAN,
          "std": open_clip.OPENAI_DATASET_STD, "interpolation": "bicubic", "resize_mode": "shortest", "fill_color": 0}
    open_clip.set_model_preprocess_cfg(model, pp)
    tokenizer = open_clip.SimpleTokenizer(context_length=TINY_CLIP_CFG["text_cfg"]["context_length"])
    return OpenClipEncoder(f"tiny-clip:{seed}", model, tokenizer, device)


# ---- openclip:<model>:<weights> ------------------------------------------------------------------------------
def clip_url_cache_dir() -> str:
    """Where open_clip keeps weights of URL-hosted tags (e.g. `openai`); open_clip has no env var for it."""
    return os.path.expanduser("~/.cache/clip")


def _resolve_tag(spec: str, model: str, tag: str, pcfg: dict[str, Any]) -> str:
    """The local file holding `model`'s weights for `tag`, or EncoderWeightsMissing with the way to get them.

    Looks where open_clip itself would have downloaded to: the Hugging Face hub cache when the tag has an
    `hf_hub` source (open_clip prefers it), then `~/.cache/clip` when it has a URL.
    """
    _import_open_clip()
    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME

    if "file" in pcfg:
        return str(pcfg["file"])
    hf_hub, url = pcfg.get("hf_hub", ""), pcfg.get("url", "")
    if not hf_hub and not url:
        raise UnknownEncoder(f"{spec}: open_clip knows no source for tag {tag!r} of {model}; give a weights file")
    looked, downloads = [], []
    example = f"openclip:{model}:/path/to/open_clip_model.safetensors"
    if hf_hub:
        # open_clip's convention: 'org/repo/filename', or 'org/repo/' for its default file; safetensors first.
        repo_id, filename = os.path.split(hf_hub)
        filename = filename or HF_WEIGHTS_NAME
        candidates = [filename]
        if filename == HF_WEIGHTS_NAME:
            candidates.insert(0, HF_SAFE_WEIGHTS_NAME)
        elif filename.endswith((".bin", ".pth")):
            candidates.insert(0, filename[:-4] + ".safetensors")
        cache = hf_cache_dir()
        from huggingface_hub import hf_hub_download

        with hub_offline():
            for fn in candidates:
                try:
                    return hf_hub_download(repo_id=repo_id, filename=fn, cache_dir=cache, local_files_only=True)
                except Exception:  # not cached under this name: try the next, then explain below
                    continue
        looked.append(f"{' or '.join(candidates)} of the Hugging Face repo {repo_id} in the hub cache {cache}")
        downloads.append(f"`hf download {repo_id} {candidates[0]} --local-dir <dir>`")
        example = f"openclip:{model}:<dir>/{candidates[0]}"
    if url:
        target = os.path.join(clip_url_cache_dir(), os.path.basename(url))
        if os.path.isfile(target):
            return target
        looked.append(target)
        downloads.append(f"`wget {url}`")
        if not hf_hub:
            example = f"openclip:{model}:/path/to/{os.path.basename(url)}"
    raise EncoderWeightsMissing(
        f"{spec}: weights not found locally (looked for {'; and '.join(looked)}) and p2n never downloads. "
        f"Download them on a machine with internet ({' or '.join(downloads)}, or in Python "
        f"open_clip.create_model_and_transforms({model!r}, pretrained={tag!r})), copy the file here and use "
        f"{example}; or copy that machine's caches here and point HF_HUB_CACHE (or HF_HOME, whose hub/ subfolder "
        f"is the cache) at the Hugging Face one; URL-hosted weights go in {clip_url_cache_dir()}."
    )


def build_openclip(arg: str | None, device: torch.device) -> OpenClipEncoder:
    spec = f"openclip:{arg}" if arg is not None else "openclip"
    usage = "use openclip:<model>:<pretrained tag or local weights file>, e.g. openclip:ViT-B-32:laion2b_s34b_b79k"
    if not arg:
        raise UnknownEncoder(f"{spec!r} names no model; {usage}")
    open_clip = _import_open_clip()

    if arg.startswith(("hf-hub:", "local-dir:")):  # open_clip schemas carry their own config and weights
        return _build_openclip_schema(spec, arg, device)

    model, _, pretrained = arg.partition(":")
    known = open_clip.list_models()
    if model not in known:
        close = difflib.get_close_matches(model, known, n=5, cutoff=0.5)
        raise UnknownEncoder(
            f"{spec}: {model!r} is not an open_clip architecture"
            + (f"; did you mean {', '.join(close)}?" if close else "")
            + f" (open_clip.list_models() lists all {len(known)}; a custom one needs open_clip.add_model_config)"
        )
    tags = open_clip.list_pretrained_tags_by_model(model)
    if not pretrained:
        # Random weights would give meaningless embeddings without any error; make the weights explicit.
        raise UnknownEncoder(
            f"{spec}: say which weights, openclip:{model}:<tag or local file>; tags for {model}: "
            f"{', '.join(tags) or '(none; give a file)'}"
        )

    pcfg = open_clip.get_pretrained_cfg(model, pretrained)
    force_pp: dict[str, Any] = {}
    quick_gelu = False
    if pcfg:
        checkpoint = _resolve_tag(spec, model, pretrained, pcfg)
        # open_clip takes mean/std/resize from the tag; passing a file instead of the tag must not lose them.
        force_pp = {k: pcfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in pcfg}
        # Weights trained with QuickGELU (openai, laion400m tags) give wrong embeddings in a GELU model;
        # open_clip only warns about the mismatch, so switch the activation to what the weights expect.
        quick_gelu = bool(pcfg.get("quick_gelu", False))
    else:
        path = Path(pretrained).expanduser()
        looks_like_path = path.suffix in _WEIGHT_SUFFIXES or os.sep in pretrained or path.exists()
        if not looks_like_path:
            raise UnknownEncoder(
                f"{spec}: {pretrained!r} is neither a pretrained tag of {model} ({', '.join(tags) or 'none'}) "
                f"nor a weights file"
            )
        if not path.is_file():
            raise EncoderWeightsMissing(
                f"{spec}: no weights file at {path}; check the path (a .safetensors or open_clip .bin/.pt "
                f"checkpoint for {model})"
            )
        checkpoint = str(path)

    try:
        with hub_offline():
            clip_model, _, _ = open_clip.create_model_and_transforms(
                model, pretrained=checkpoint, device="cpu", weights_only=True,
                force_quick_gelu=quick_gelu, image_mean=force_pp.get("mean"), image_std=force_pp.get("std"),
                image_interpolation=force_pp.get("interpolation"), image_resize_mode=force_pp.get("resize_mode"),
            )
            tokenizer = open_clip.get_tokenizer(model)
    except Exception as e:
        raise _load_error(spec, checkpoint, e) from e
    return OpenClipEncoder(spec, clip_model, tokenizer, device)


def _build_openclip_schema(spec: str, model_ref: str, device: torch.device) -> OpenClipEncoder:
    open_clip = _import_open_clip()
    try:
        with hub_offline():
            clip_model, _, _ = open_clip.create_model_and_transforms(
                model_ref, device="cpu", weights_only=True, cache_dir=hf_cache_dir(), require_pretrained=True
            )
            tokenizer = open_clip.get_tokenizer(model_ref, cache_dir=hf_cache_dir())
    except Exception as e:
        if model_ref.startswith("hf-hub:"):
            repo = model_ref[len("hf-hub:"):]
            raise EncoderWeightsMissing(
                f"{spec}: could not load {repo} from the local Hugging Face cache {hf_cache_dir()} and p2n never "
                f"downloads ({type(e).__name__}: {e}). On a machine with internet run `hf download {repo} "
                f"--local-dir <dir>`, copy <dir> here and use openclip:local-dir:<dir>; or point HF_HUB_CACHE "
                f"(or HF_HOME) at a copied cache."
            ) from e
        raise _load_error(spec, model_ref, e) from e
    return OpenClipEncoder(spec, clip_model, tokenizer, device)


def _load_error(spec: str, checkpoint: str, e: Exception) -> Exception:
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    if any(type(x).__name__ in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") for x in chain):
        # e.g. an architecture whose text tower or tokenizer comes from the Hugging Face hub
        return EncoderWeightsMissing(
            f"{spec}: needs Hugging Face hub files that are not in the local cache {hf_cache_dir()} and p2n never "
            f"downloads ({type(e).__name__}: {e}); load the model once on a machine with internet and copy its "
            f"Hugging Face cache here, pointing HF_HUB_CACHE (or HF_HOME) at it"
        )
    if isinstance(e, OSError):
        return EncoderWeightsMissing(f"{spec}: cannot read {checkpoint}: {e}")
    return EncoderError(
        f"{spec}: loading {checkpoint} failed ({type(e).__name__}: {e}); check that the file is an open_clip "
        f"checkpoint of this architecture (state_dict keys and shapes must match)"
    )
