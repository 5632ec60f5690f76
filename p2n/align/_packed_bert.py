"""A padding-free forward pass of a BERT sentence encoder (all-MiniLM-L6-v2): the batch's tokens in one row.

A padded batch computes every prompt at the length of the longest one. Prompts are short and uneven (a catalogue
caption is 5-11 tokens, a user's sentence can be 60), so a padded batch spends much of its compute on padding,
and sorting into length buckets trades that for one fixed-cost pass per bucket. Here the batch's tokens are
concatenated into one ``[T, D]`` sequence ("packed", as varlen attention kernels do): every linear layer runs once
on exactly the real tokens, and attention stays within each prompt through a block-diagonal mask. On the 2-core
CPU, 32 catalogue captions (167 tokens): 31.5 -> ~20 ms; one prompt: 5.7 -> 3.4 ms. The embeddings are those of
the sentence-transformers pipeline (Transformer -> mean Pooling -> Normalize) to float rounding (~2e-7); a test
holds the two together.

Only the architecture it was written for is taken: a HF ``BertModel`` with absolute positions and GELU, under mean
pooling. :func:`packed_bert` returns None for anything else, and the caller keeps the library's own forward.

Does not own: loading the model or validating prompts (``_minilm.py``, ``encoders.py``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

# Tokens per packed forward pass. Attention over a pack is [T, T] with only the diagonal blocks used, so a pack
# much longer than one prompt wastes attention work; at 1024 tokens that is under 10% of the linear layers'.
PACK_TOKENS = 1024


class PackedBert:
    """Holds a BertModel's weights (QKV fused into one matrix per layer) and runs packed batches through it."""

    def __init__(self, bert: Any, tokenizer: Any, max_length: int):
        self.bert = bert
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.heads = int(bert.config.num_attention_heads)
        self.layers = list(bert.encoder.layer)
        with torch.no_grad():
            self.qkv = [
                (torch.cat([s.query.weight, s.key.weight, s.value.weight]).contiguous(),
                 torch.cat([s.query.bias, s.key.bias, s.value.bias]).contiguous())
                for s in (layer.attention.self for layer in self.layers)
            ]

    def token_ids(self, prompts: list[str]) -> list[list[int]]:
        return self.tokenizer(prompts, add_special_tokens=True, truncation=True, max_length=self.max_length,
                              verbose=False)["input_ids"]

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> Tensor:
        """Mean-pooled token states ``[B, D]`` (not normalised) of ``prompts``, in their order."""
        ids = self.token_ids(prompts)
        out, start = [], 0
        while start < len(ids):  # consecutive prompts up to PACK_TOKENS per pass (at least one)
            end, total = start + 1, len(ids[start])
            while end < len(ids) and total + len(ids[end]) <= PACK_TOKENS:
                total += len(ids[end])
                end += 1
            out.append(self._forward_pack(ids[start:end]))
            start = end
        return torch.cat(out)

    def _forward_pack(self, ids: list[list[int]]) -> Tensor:
        dev = self.qkv[0][0].device
        lengths = torch.tensor([len(i) for i in ids], device=dev)
        flat = torch.tensor([t for seq in ids for t in seq], device=dev)
        segment = torch.repeat_interleave(torch.arange(len(ids), device=dev), lengths)
        position = torch.arange(len(flat), device=dev) - (torch.cumsum(lengths, 0) - lengths)[segment]
        emb = self.bert.embeddings
        x = emb.word_embeddings(flat) + emb.position_embeddings(position) + emb.token_type_embeddings.weight[0]
        x = emb.LayerNorm(x)
        n = x.shape[0]
        # [1, 1, T, T]: a 4-d query/mask keeps SDPA on its fused CPU kernel; 3-d inputs fall back to the
        # unfused path, 2.5x slower here.
        mask = (segment[:, None] == segment[None, :])[None, None]
        for layer, (w, b) in zip(self.layers, self.qkv):
            q, k, v = F.linear(x, w, b).view(1, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0].transpose(0, 1).reshape(n, -1)
            att = layer.attention.output
            x = att.LayerNorm(att.dense(a) + x)
            h = layer.intermediate.intermediate_act_fn(layer.intermediate.dense(x))
            x = layer.output.LayerNorm(layer.output.dense(h) + x)
        pooled = x.new_zeros(len(ids), x.shape[1]).index_add_(0, segment, x)
        return pooled / lengths[:, None].to(x.dtype)


def packed_bert(st_model: Any) -> PackedBert | None:
    """A :class:`PackedBert` over a SentenceTransformer's modules, or None when they are not the BERT + mean
    pooling pipeline this forward reproduces (then the model's own ``encode`` is the right path)."""
    try:
        modules = list(st_model)
        transformer, pooling = modules[0], modules[1]
        bert = transformer.auto_model
        cfg = bert.config
        mode = getattr(pooling, "pooling_mode", None)
        if mode is None and getattr(pooling, "pooling_mode_mean_tokens", False):  # sentence-transformers < 6
            others = ("cls_token", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
            mode = "mean" if not any(getattr(pooling, f"pooling_mode_{o}", False) for o in others) else None
        supported = (
            type(bert).__name__ == "BertModel"
            and getattr(cfg, "position_embedding_type", "absolute") == "absolute"
            and cfg.hidden_act == "gelu"
            and not cfg.is_decoder
            and not getattr(transformer, "do_lower_case", False)  # the tokenizer itself lowercases for MiniLM
            and mode == "mean"
            and all(type(m).__name__ == "Normalize" for m in modules[2:])
        )
        if not supported:
            return None
        return PackedBert(bert, st_model.tokenizer, int(st_model.max_seq_length))
    except (AttributeError, IndexError, TypeError):
        return None
