"""`hash[:<dim>]`: a deterministic text encoder with no model and no dependency beyond torch.

Features are lower-cased words and character trigrams of `#word#`, hashed (blake2b, so identical in every process,
unlike Python's salted `hash`) into `dim` signed buckets. It matches spelling, not meaning ("red cube" is near
"red cubes", not near "crimson box"): a fast fallback and a test double, not a substitute for CLIP or minilm.

Does not own: prompt validation and normalisation (`encoders.py`).
"""

from __future__ import annotations

import hashlib
import re

import torch
from torch import Tensor

from p2n.align.encoders import PromptEncoder

_WORD = re.compile(r"\w+", re.UNICODE)
_TRIGRAM_WEIGHT = 0.5  # words carry most of the signal; trigrams let inflections and typos overlap


class HashEncoder(PromptEncoder):
    supports_images = False
    context_length = None  # no tokenizer limit

    def __init__(self, dim: int = 512, device: torch.device | str = "cpu") -> None:
        self.name = f"hash:{dim}"
        self.dim = dim
        self.device = torch.device(device)

    def count_tokens(self, text: str) -> int:
        return len(_WORD.findall(text))

    def _features(self, text: str) -> list[tuple[str, float]]:
        words = [w.lower() for w in _WORD.findall(text)]
        feats = [(f"w:{w}", 1.0) for w in words]
        for w in words:
            padded = f"#{w}#"
            feats += [(f"c:{padded[i:i + 3]}", _TRIGRAM_WEIGHT) for i in range(len(padded) - 2)]
        return feats

    def _encode_text(self, prompts: list[str]) -> Tensor:
        out = torch.zeros(len(prompts), self.dim)
        for row, text in enumerate(prompts):
            for feat, weight in self._features(text):
                h = int.from_bytes(hashlib.blake2b(feat.encode("utf-8"), digest_size=8).digest(), "little")
                sign = 1.0 if (h >> 63) & 1 else -1.0  # signed hashing: collisions cancel instead of piling up
                out[row, h % self.dim] += sign * weight
        return out.to(self.device)
