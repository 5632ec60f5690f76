"""Tests for p2n.align.encoders: the registry, tiny-clip, minilm, hash, prompt/image validation, offline open_clip
loading from local files, and the torchvision import workaround. Models are built once per module."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from p2n.align import (
    EncoderError,
    EncoderWeightsMissing,
    ImageError,
    ImagesNotSupported,
    PromptError,
    PromptTooLong,
    UnknownEncoder,
    available_encoders,
    build_encoder,
)
from p2n.align._torchvision_compat import ensure_torchvision_importable
from p2n.errors import P2NError

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["a red cube", "a blue sphere", "a tall green cylinder"]


@pytest.fixture(scope="module")
def tiny():
    return build_encoder("tiny-clip:0")


@pytest.fixture(scope="module")
def minilm():
    return build_encoder("minilm")


@pytest.fixture(scope="module")
def hashenc():
    return build_encoder("hash")


def _open_clip():
    ensure_torchvision_importable()  # open_clip imports torchvision, which needs the shim on this stack
    import open_clip

    return open_clip


def _images(seed: int, b: int = 2, h: int = 64, w: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, w, 3, generator=g)


# ---- registry ----------------------------------------------------------------------------------------------
def test_unknown_encoder_lists_every_name_and_the_format():
    with pytest.raises(UnknownEncoder) as ei:
        build_encoder("clip-large")
    msg = str(ei.value)
    assert isinstance(ei.value, ValueError) and isinstance(ei.value, P2NError)
    assert "'clip-large'" in msg and "name[:argument]" in msg
    for name in ("openclip:<model>:<pretrained tag or local weights file>", "tiny-clip[:<seed>]", "minilm", "hash"):
        assert name in msg
    assert set(available_encoders()) == {"openclip", "tiny-clip", "minilm", "hash"}


@pytest.mark.parametrize(
    "spec, needle",
    [("tiny-clip:abc", "seed must be an integer"), ("minilm:large", "takes no argument"),
     ("hash:3", ">= 8"), ("", "non-empty"), ("openclip", "names no model")],
)
def test_malformed_arguments_are_unknown_encoder(spec, needle):
    with pytest.raises(UnknownEncoder, match=re.escape(needle)):
        build_encoder(spec)


# ---- tiny-clip ---------------------------------------------------------------------------------------------
def test_tiny_clip_text_embeddings(tiny):
    assert (tiny.name, tiny.dim, tiny.context_length, tiny.supports_images) == ("tiny-clip:0", 64, 77, True)
    n_params = sum(p.numel() for p in tiny.model.parameters())
    assert 2_500_000 < n_params < 4_500_000
    e = tiny.encode_text(PROMPTS)
    assert e.shape == (3, 64) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    cos = e @ e.T
    assert float(cos[0, 1]) < 0.95  # different prompts, different embeddings
    # batching does not change a prompt's embedding
    torch.testing.assert_close(tiny.encode_text([PROMPTS[1]])[0], e[1], atol=1e-5, rtol=0)
    assert tiny.encode_text([]).shape == (0, 64)


def test_tiny_clip_is_deterministic_per_seed_and_leaves_the_global_rng_alone(tiny):
    state = torch.random.get_rng_state()
    again = build_encoder("tiny-clip:0")
    assert torch.equal(torch.random.get_rng_state(), state)
    imgs = _images(1)
    assert torch.equal(again.encode_text(PROMPTS), tiny.encode_text(PROMPTS))
    assert torch.equal(again.encode_image(imgs), tiny.encode_image(imgs))
    other = build_encoder("tiny-clip:1")
    assert not torch.allclose(other.encode_text(PROMPTS), tiny.encode_text(PROMPTS), atol=1e-3)


def test_tiny_clip_image_embeddings(tiny):
    imgs = _images(0, b=3, h=64, w=64)
    e = tiny.encode_image(imgs)
    assert e.shape == (3, 64) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert float((e[0] - e[1]).abs().max()) > 1e-4
    # other sizes are resized to the model's 64 px; a list of PIL images takes the same path as a tensor
    from PIL import Image

    big = _images(2, b=1, h=96, w=128)
    arr = (big[0].numpy() * 255).round().astype(np.uint8)
    from_tensor = tiny.encode_image(torch.from_numpy(arr).float()[None] / 255)
    from_pil = tiny.encode_image([Image.fromarray(arr), Image.fromarray(arr[:40, :50])])
    assert from_pil.shape == (2, 64)
    torch.testing.assert_close(from_pil[0], from_tensor[0], atol=1e-6, rtol=0)


def test_torch_preprocessing_matches_open_clip_pil_pipeline(tiny):
    open_clip = _open_clip()
    from PIL import Image

    # smooth content (as renders are), 96x128 -> shortest side to 64, centre crop: open_clip's eval transform
    g = torch.Generator().manual_seed(3)
    smooth = F.interpolate(torch.rand(1, 3, 12, 16, generator=g), size=(96, 128), mode="bilinear")
    arr = (smooth[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    ref = open_clip.image_transform(64, is_train=False)(Image.fromarray(arr))
    ours = tiny.preprocess_images(torch.from_numpy(arr).float()[None] / 255)[0]
    assert ours.shape == ref.shape == (3, 64, 64)
    # within ~2 uint8 levels (PIL resamples in uint8, torch in float); normalised units are ~1/(255 * 0.27)
    assert float((ours - ref).abs().max()) < 0.03


# ---- minilm ------------------------------------------------------------------------------------------------
def test_minilm_understands_paraphrases(minilm):
    assert (minilm.name, minilm.dim, minilm.context_length, minilm.supports_images) == ("minilm", 384, 256, False)
    e = minilm.encode_text(["a red cube", "a crimson box", "a blue sphere"])
    assert e.shape == (3, 384) and e.dtype == torch.float32
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])
    f = minilm.encode_text(["a small wooden chair", "a little timber seat", "a large metal car"])
    assert float(f[0] @ f[1]) > float(f[0] @ f[2]) + 0.2
    torch.testing.assert_close(minilm.encode_text(["a red cube"])[0], e[0], atol=1e-5, rtol=0)


def test_minilm_length_buckets_keep_each_prompt_its_own_embedding(minilm):
    """Mixed short and long prompts run in length buckets: every row must still be that prompt's embedding, in
    the order given (compared with one prompt at a time, where no padding or bucketing happens)."""
    prompts = ["a long and winding description of a small red cube sitting on top of a large blue sphere",
               "a box", "a crimson cube", "an emerald ball resting on a chocolate brown cylinder", "a cone"]
    together = minilm.encode_text(prompts)
    alone = torch.cat([minilm.encode_text([p]) for p in prompts])
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=0)


def test_minilm_packed_forward_equals_the_sentence_transformers_pipeline(minilm):
    """The padding-free forward must give the library's own embeddings (padded encode: Transformer -> mean
    Pooling -> Normalize) for short, long, unicode and near-context prompts, across several packs, in order."""
    from p2n.align import _packed_bert

    assert minilm.packed is not None
    prompts = ["a red cube", "x", "une boîte rouge posée sur une sphère bleue 🟥",
               "a long and winding description of a small red cube sitting on top of a large blue sphere",
               "cube " * 250, "an emerald ball resting on a chocolate brown cylinder", "a cone"] * 5
    assert sum(minilm.count_tokens_many(prompts)) > _packed_bert.PACK_TOKENS  # more than one pack
    ours = minilm.encode_text(prompts)
    ref = minilm.model.encode(prompts, convert_to_tensor=True, normalize_embeddings=True, show_progress_bar=False)
    torch.testing.assert_close(ours, ref.float(), atol=2e-5, rtol=0)
    assert minilm.count_tokens_many(prompts) == [minilm.count_tokens(p) for p in prompts]


def test_packed_forward_is_refused_for_a_pipeline_it_does_not_reproduce(minilm):
    """Another pooling (or model) than mean-pooled BERT: no packed forward, so the library's encode is used."""
    from p2n.align._packed_bert import packed_bert

    pooling = minilm.model[1]
    mode = pooling.pooling_mode
    try:
        pooling.pooling_mode = "cls"
        assert packed_bert(minilm.model) is None
    finally:
        pooling.pooling_mode = mode
    assert packed_bert(minilm.model) is not None
    assert packed_bert(object()) is None
    padded = minilm._encode_text_padded(["a red cube", "a long sentence about a blue sphere on a box"])
    torch.testing.assert_close(F.normalize(padded.float(), dim=-1),
                               minilm.encode_text(["a red cube", "a long sentence about a blue sphere on a box"]),
                               atol=2e-5, rtol=0)


def test_length_buckets_are_optimal_and_cover_the_batch():
    import itertools
    import random

    from p2n.align._minilm import length_buckets

    def cost(lengths, runs, pass_cost):
        return sum((hi - lo) * lengths[hi - 1] + pass_cost for lo, hi in runs)

    rng = random.Random(0)
    for _ in range(200):
        lengths = sorted(rng.randint(3, 40) for _ in range(rng.randint(1, 9)))
        pass_cost = rng.choice([0, 5, 25, 1000])
        runs = length_buckets(lengths, pass_cost)
        assert runs[0][0] == 0 and runs[-1][1] == len(lengths)
        assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(runs, runs[1:]))
        # brute force over every set of cut points
        best = min(cost(lengths, list(zip((0, *cuts), (*cuts, len(lengths)))), pass_cost)
                   for r in range(len(lengths)) for cuts in itertools.combinations(range(1, len(lengths)), r))
        assert cost(lengths, runs, pass_cost) == best
    assert length_buckets([], 25) == []
    assert length_buckets([5, 5, 5], 25) == [(0, 3)]  # one length: one pass
    assert length_buckets([5, 60], 25) == [(0, 1), (1, 2)]  # padding 5 -> 60 costs more than a second pass


def test_text_only_encoders_refuse_images(minilm, hashenc):
    for enc in (minilm, hashenc):
        with pytest.raises(ImagesNotSupported, match="text-only"):
            enc.encode_image(_images(0))


def test_hash_encoder_is_deterministic_and_lexical(hashenc):
    e = hashenc.encode_text(["a red cube", "a red cubes", "a blue sphere"])
    assert e.shape == (3, 512)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])
    # blake2b, not Python's salted hash(): the same numbers in every process
    assert torch.equal(build_encoder("hash").encode_text(["a red cube"])[0], e[0])
    assert build_encoder("hash:64").dim == 64


# ---- prompt validation (every encoder) --------------------------------------------------------------------
@pytest.fixture(params=["tiny", "minilm", "hashenc"])
def encoder(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("bad", ["", "   ", " \n\t "])
def test_empty_prompt(encoder, bad):
    with pytest.raises(PromptError, match="empty prompt"):
        encoder.encode_text([bad])


@pytest.mark.parametrize("bad", [None, 3, b"a red cube", ["a red cube"]])
def test_non_str_prompt(encoder, bad):
    with pytest.raises(PromptError, match="must be a str"):
        encoder.validate_prompt(bad)


@pytest.mark.parametrize("bad, code", [("a red\x00cube", "U+0000"), ("\x1b[31ma red cube", "U+001B")])
def test_control_characters(encoder, bad, code):
    with pytest.raises(PromptError, match=re.escape(code)):
        encoder.encode_text([bad])


def test_embeddings_can_feed_a_trainable_model(encoder):
    e = encoder.encode_text(PROMPTS[:2])
    assert not e.requires_grad and not e.is_inference()
    head = torch.nn.Linear(encoder.dim, 4)
    head(e).pow(2).sum().backward()  # fails on inference-mode tensors ("cannot be saved for backward")
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0


def test_validation_strips_and_keeps_newlines(encoder):
    assert encoder.validate_prompt("  a red\ncube\t ") == "a red\ncube"


def test_batch_errors_name_the_index_and_str_is_not_a_batch(tiny):
    with pytest.raises(PromptError, match=r"^prompts\[1\]: empty prompt"):
        tiny.encode_text(["a red cube", "  "])
    with pytest.raises(PromptError, match=r"pass \[prompt\]"):
        tiny.encode_text("a red cube")


def test_prompt_too_long_counts_with_the_encoders_tokenizer(tiny, minilm):
    # open_clip BPE: "cube" is one token, plus start/end: 75 words fit 77 exactly, 76 do not
    assert tiny.count_tokens("cube " * 75) == 77
    assert tiny.validate_prompt("cube " * 75).startswith("cube")
    with pytest.raises(PromptTooLong, match=re.escape("prompt has 78 tokens > 77 (the tiny-clip:0 encoder's context)")):
        tiny.validate_prompt("cube " * 76)
    with pytest.raises(PromptTooLong, match="202 tokens > 77.*shorten the prompt"):
        tiny.encode_text(["cube " * 200])
    # WordPiece with [CLS]/[SEP]: 300 words -> 302 tokens > 256
    with pytest.raises(PromptTooLong, match="302 tokens > 256"):
        minilm.encode_text(["cube " * 300])
    with pytest.raises(PromptTooLong, match=r"^prompts\[2\]: prompt has 302 tokens > 256"):  # counted as a batch
        minilm.validate_prompts(["a red cube", "a box", "cube " * 300])
    assert isinstance(PromptTooLong("x"), PromptError)


# ---- image validation --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "images, needle",
    [
        (torch.full((1, 16, 16, 3), float("nan")), "non-finite"),
        (torch.rand(16, 16, 3), "add a batch dimension"),
        (torch.rand(1, 3, 16, 16), "channels-first"),
        (torch.rand(1, 16, 16, 4), "3 (RGB) channels"),
        (torch.rand(1, 4, 4, 3), "smaller than 8 px"),
        (torch.zeros(1, 16, 16, 3, dtype=torch.uint8), "float tensor"),
        (torch.rand(1, 16, 16, 3) * 255, "divide by 255"),
        (torch.rand(1, 16, 16, 3) - 0.5, "must be in [0, 1]"),
        ("render.png", "PIL images"),
        ([np.zeros((16, 16, 3))], "PIL image or an [H, W, 3] tensor"),
    ],
)
def test_image_errors(tiny, images, needle):
    with pytest.raises(ImageError, match=re.escape(needle)):
        tiny.encode_image(images)


# ---- openclip: local weights, offline ----------------------------------------------------------------------
TEST_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 32, "layers": 1, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def registered_arch(tmp_path_factory):
    """A custom architecture registered with open_clip the public way (a folder of JSON configs), and a
    reference model of it with seeded weights; unregistered afterwards."""
    open_clip = _open_clip()
    from open_clip import factory

    name = "p2n-test-tiny"
    cfg_dir = tmp_path_factory.mktemp("open_clip_configs")
    (cfg_dir / f"{name}.json").write_text(json.dumps(TEST_CFG))
    open_clip.add_model_config(cfg_dir)
    torch.manual_seed(123)
    model = open_clip.create_model(name).eval()
    yield name, model
    factory._MODEL_CONFIG_PATHS.remove(cfg_dir)
    factory._MODEL_CONFIGS.pop(name, None)


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "pt"])
def test_openclip_loads_local_weights_exactly(registered_arch, tmp_path, fmt):
    open_clip = _open_clip()
    from safetensors.torch import save_file

    name, ref = registered_arch
    sd = ref.state_dict()
    path = tmp_path / f"open_clip_model.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "bin":
        torch.save(sd, path)
    else:  # training checkpoints wrap the weights as {"state_dict": ...} with "module." prefixes
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)

    enc = build_encoder(f"openclip:{name}:{path}")
    assert (enc.name, enc.dim, enc.context_length, enc.image_size) == (f"openclip:{name}:{path}", 32, 77, (64, 64))
    for k, v in enc.model.state_dict().items():
        assert torch.equal(v, sd[k]), k

    tok = open_clip.get_tokenizer(name)
    with torch.no_grad():
        want_text = F.normalize(ref.encode_text(tok(PROMPTS)), dim=-1)
        imgs = _images(5, b=2, h=64, w=64)  # already at the model's size: preprocessing is mean/std only
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        want_img = F.normalize(ref.encode_image((imgs.permute(0, 3, 1, 2) - mean) / std), dim=-1)
    torch.testing.assert_close(enc.encode_text(PROMPTS), want_text, atol=1e-6, rtol=0)
    torch.testing.assert_close(enc.encode_image(imgs), want_img, atol=1e-6, rtol=0)


def test_openclip_tags_resolve_from_prepopulated_caches_only(registered_arch, tmp_path, monkeypatch):
    """What the EncoderWeightsMissing message tells users to do works: a Hugging Face cache copied here and named
    by HF_HUB_CACHE, or a file in ~/.cache/clip for URL-hosted tags. The tags' preprocessing and QuickGELU apply."""
    _open_clip()
    from open_clip import pretrained
    from open_clip.transformer import QuickGELU
    from safetensors.torch import save_file

    name, ref = registered_arch
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    monkeypatch.setitem(pretrained._PRETRAINED, name, {
        "hubtag": {"hf_hub": "p2n-test/tiny-arch/", "url": "", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25),
                   "interpolation": "bilinear", "resize_mode": "squash"},
        "urltag": {"url": "https://example.invalid/weights/tiny-arch.pt", "hf_hub": "", "quick_gelu": True},
    })
    # the hub cache layout huggingface_hub writes: models--org--repo/{refs/main, snapshots/<commit>/file}
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hf" / "models--p2n-test--tiny-arch"
    (repo_dir / "snapshots" / commit).mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    save_file(sd, str(repo_dir / "snapshots" / commit / "open_clip_model.safetensors"))
    (tmp_path / "home" / ".cache" / "clip").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "home" / ".cache" / "clip" / "tiny-arch.pt")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))

    hub = build_encoder(f"openclip:{name}:hubtag")
    assert all(torch.equal(v, sd[k]) for k, v in hub.model.state_dict().items())
    assert (hub.image_mean, hub.image_std, hub.image_interpolation, hub.image_resize_mode) == (
        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", "squash")
    assert not isinstance(hub.model.transformer.resblocks[0].mlp.gelu, QuickGELU)

    url = build_encoder(f"openclip:{name}:urltag")
    assert all(torch.equal(v, sd[k]) for k, v in url.model.state_dict().items())
    assert isinstance(url.model.transformer.resblocks[0].mlp.gelu, QuickGELU)  # what the weights were trained with


def test_openclip_refuses_pickled_objects_and_wrong_architectures(registered_arch, tmp_path, tiny):
    name, ref = registered_arch
    evil = tmp_path / "evil.bin"
    torch.save({"state_dict": ref.state_dict(), "hook": Path("/etc/passwd")}, evil)  # a non-tensor object
    with pytest.raises(EncoderError, match="loading .*evil.bin failed"):
        build_encoder(f"openclip:{name}:{evil}")
    other = tmp_path / "tiny_clip.bin"
    torch.save(tiny.model.state_dict(), other)  # a different architecture's weights
    with pytest.raises(EncoderError, match="architecture"):
        build_encoder(f"openclip:{name}:{other}")


def test_openclip_missing_weights_fail_fast_and_say_how_to_fix(monkeypatch, tmp_path, tiny):
    import huggingface_hub.constants as hf_constants

    # empty caches, so the answer cannot depend on this machine; tiny is requested so open_clip is imported
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    offline_before = (hf_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE"))
    t0 = time.perf_counter()
    with pytest.raises(EncoderWeightsMissing) as ei:
        build_encoder("openclip:ViT-B-32:laion2b_s34b_b79k")
    assert time.perf_counter() - t0 < 5.0  # looked in the cache only; no network attempt to time out
    msg = str(ei.value)
    assert msg.startswith("openclip:ViT-B-32:laion2b_s34b_b79k: weights not found locally")
    for needle in ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", str(tmp_path / "hf"), "hf download",
                   "openclip:ViT-B-32:<dir>/open_clip_model.safetensors", "HF_HUB_CACHE", "HF_HOME"):
        assert needle in msg, needle
    assert (hf_constants.HF_HUB_OFFLINE, os.environ.get("HF_HUB_OFFLINE")) == offline_before  # switch restored

    with pytest.raises(EncoderWeightsMissing, match=re.escape(str(tmp_path / "home" / ".cache" / "clip"))):
        build_encoder("openclip:ViT-B-32:openai")  # URL-hosted tag: open_clip's ~/.cache/clip
    with pytest.raises(EncoderWeightsMissing, match="no weights file at"):
        build_encoder(f"openclip:ViT-B-32:{tmp_path / 'missing.safetensors'}")
    with pytest.raises(UnknownEncoder, match="say which weights.*laion2b_s34b_b79k"):
        build_encoder("openclip:ViT-B-32")
    with pytest.raises(UnknownEncoder, match="did you mean ViT-B-32"):
        build_encoder("openclip:ViT-B-3:openai")


# ---- torchvision workaround --------------------------------------------------------------------------------
def test_torchvision_shim_applies_only_when_torchvision_is_broken():
    script = """
import json, sys
try:
    import torchvision
    broken = False
except RuntimeError as e:
    broken = "torchvision::nms does not exist" in str(e)
from p2n.align._torchvision_compat import ensure_torchvision_importable, shim_applied
applied = ensure_torchvision_importable()
import torch, torchvision.transforms.functional as TF
x = TF.resize(torch.rand(3, 20, 20), [8, 8], antialias=True)
print(json.dumps({"broken": broken, "applied": applied, "again": ensure_torchvision_importable(),
                  "shape": list(x.shape)}))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["applied"] == res["broken"]  # inert on a working install, applied exactly when needed
    assert res["again"] == res["applied"]  # idempotent
    assert res["shape"] == [3, 8, 8]
