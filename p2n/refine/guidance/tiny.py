"""Tiny random-weight diffusion models in the exact on-disk layouts the guidances load, for tests and demos.

``build_tiny_sd(folder)`` writes a Stable-Diffusion-layout folder (unet/, vae/, text_encoder/, tokenizer/,
scheduler/, model_index.json) and ``build_tiny_zero123(folder)`` a Zero-1-to-3-layout one (unet/ with
in_channels 8, vae/, image_encoder/, feature_extractor/, cc_projection/, scheduler/), each component written with
its library's ``save_pretrained`` (the projection as CCProjection's config.json + safetensors), so the guidances
read them through the same ``from_pretrained(folder, subfolder=...)`` path as real weights. Nothing is downloaded:
the tokenizer's vocabulary is generated here (byte-level alphabet + a few merges), in the vocab.json/merges.txt
files a real SD folder ships.

Sizes: images 64x64 -> VAE (4 blocks, /8) -> latents 4x8x8; UNet block_out_channels (32, 64), one layer per
block, cross-attention dim 32 (~0.8 M UNet parameters); CLIP text/vision towers hidden 32, 2 layers. A build
takes 0.1–0.2 s once diffusers and transformers are imported (~4 s).
The weights are random: outputs mean nothing, but every shape, key and code path is the real one.

Does not own: how the guidances use the models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from p2n.align._torchvision_compat import ensure_torchvision_importable

TINY_IMAGE_SIZE = 64  # pixels; latents are 8x8
TINY_EMBED_DIM = 32  # cross-attention / CLIP projection width
TINY_MAX_TOKENS = 77  # SD's text length, kept so prompts pad/truncate exactly as with real weights

# Words the tiny vocabulary merges into whole tokens (everything else falls back to single bytes).
_TINY_WORDS = ("a", "photo", "of", "the", "red", "green", "blue", "chair", "car", "cube", "sphere", "dog", "cat",
               "table", "lamp", "wooden", "metal", "3d", "render", "high", "quality", "blurry", "ugly")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode map (the alphabet of byte-level BPE)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tiny_bpe_vocab() -> tuple[dict[str, int], list[str]]:
    """A small valid CLIP BPE vocabulary: (token -> id, merges), ~560 tokens.

    Layout as in CLIP's: the 256 byte symbols, the same with the end-of-word marker "</w>", the merged tokens in
    merge order, then <|startoftext|> and <|endoftext|>. Merges build each word of _TINY_WORDS left to right
    ("r e" -> "re", "re d</w>" -> "red</w>"), so those words become one token each.
    """
    alphabet = list(_bytes_to_unicode().values())
    tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    known = set(tokens)
    for word in _TINY_WORDS:
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in known:
                merges.append(f"{left} {right}")
                tokens.append(merged)
                known.add(merged)
            left = merged
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _write_tokenizer(folder: Path) -> dict[str, int]:
    """vocab.json + merges.txt + tokenizer_config.json, the files of a real SD tokenizer/ folder."""
    vocab, merges = tiny_bpe_vocab()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": TINY_MAX_TOKENS,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }))
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }))
    return vocab


def _tiny_vae():
    from diffusers import AutoencoderKL

    # 4 blocks = downscale 8 like SD's VAE; SD's scaling factor so latents are scaled exactly as with real weights.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
        sample_size=TINY_IMAGE_SIZE, scaling_factor=0.18215,
    )


def _tiny_unet(in_channels: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=TINY_IMAGE_SIZE // 8, in_channels=in_channels, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=TINY_EMBED_DIM,
        attention_head_dim=8, norm_num_groups=32,
    )


# SD 1.x/2.x's noise schedule (scaled_linear 0.00085 .. 0.012 over 1000 steps), which zero123 also uses.
_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}


def build_tiny_sd(folder: str | Path, seed: int = 0) -> Path:
    """Write a random tiny Stable-Diffusion-layout model to ``folder``; returns the folder."""
    ensure_torchvision_importable()  # diffusers/transformers import torchvision
    from diffusers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = _write_tokenizer(folder / "tokenizer")
    with torch.random.fork_rng(devices=[]):  # seeded weights without disturbing the caller's RNG
        torch.manual_seed(seed)
        unet, vae = _tiny_unet(in_channels=4), _tiny_vae()
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=TINY_EMBED_DIM, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TINY_MAX_TOKENS, projection_dim=TINY_EMBED_DIM,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
        ))
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    text_encoder.save_pretrained(folder / "text_encoder")
    # SD 2.1-base ships a PNDM sampler config; the guidance reads only its beta schedule.
    PNDMScheduler(skip_prk_steps=True, **{k: v for k, v in _SCHEDULE.items() if k != "clip_sample"}).save_pretrained(
        folder / "scheduler")
    _write_model_index(folder, "StableDiffusionPipeline", {
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False,
    })
    return folder


def build_tiny_zero123(folder: str | Path, seed: int = 0) -> Path:
    """Write a random tiny Zero-1-to-3-layout model to ``folder``; returns the folder."""
    ensure_torchvision_importable()  # diffusers/transformers import torchvision
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet, vae = _tiny_unet(in_channels=8), _tiny_vae()  # 8 = noisy latents ⊕ reference latents
        image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
            hidden_size=TINY_EMBED_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            image_size=32, patch_size=8, projection_dim=TINY_EMBED_DIM,
        ))
        projection = torch.nn.Linear(TINY_EMBED_DIM + 4, TINY_EMBED_DIM)  # real: Linear(768 + 4, 768)
    unet.save_pretrained(folder / "unet")
    vae.save_pretrained(folder / "vae")
    image_encoder.save_pretrained(folder / "image_encoder")
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    ).save_pretrained(folder / "feature_extractor")
    # What diffusers' save_pretrained writes for the community pipeline's CCProjection(ModelMixin, ConfigMixin).
    cc = folder / "cc_projection"
    cc.mkdir(exist_ok=True)
    save_file({"projection.weight": projection.weight.detach().contiguous(),
               "projection.bias": projection.bias.detach().contiguous()},
              str(cc / "diffusion_pytorch_model.safetensors"))
    (cc / "config.json").write_text(json.dumps({"_class_name": "CCProjection", "in_channel": TINY_EMBED_DIM + 4,
                                                "out_channel": TINY_EMBED_DIM}))
    DDIMScheduler(**_SCHEDULE).save_pretrained(folder / "scheduler")
    _write_model_index(folder, "Zero1to3StableDiffusionPipeline", {
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "feature_extractor": ["transformers", "CLIPImageProcessor"],
        "cc_projection": ["pipeline_zero1to3", "CCProjection"], "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [None, None], "requires_safety_checker": False,
    })
    return folder


def _write_model_index(folder: Path, class_name: str, components: dict) -> None:
    import diffusers

    index = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **components}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
