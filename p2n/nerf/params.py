"""NeRF parameter vectors: the named layout, flatten <-> unflatten, and safetensors files with metadata.

A NeRF in p2n *is* a flat float32 vector whose meaning is fixed by the field config (``FieldConfig``). The
layout is versioned (``LAYOUT_VERSION``) and fingerprinted (``FieldConfig.layout_hash``): a file written for one
layout refuses to load into another. Files are safetensors (never pickles) with a JSON metadata header.

Does not own: what the parameters compute (``field.py``).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from p2n.config import FieldConfig
from p2n.errors import P2NError

LAYOUT_VERSION = 1
FORMAT = "p2n.nerf"


class ParamsError(P2NError):
    """A parameter file or vector that cannot be used: wrong layout, wrong kind, NaNs."""


@dataclass(frozen=True)
class ParamLayout:
    """Ordered (name, shape) pairs; the flat vector is their concatenation in this order."""

    entries: tuple[tuple[str, tuple[int, ...]], ...]

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for _, s in self.entries]

    @property
    def numel(self) -> int:
        return sum(self.sizes)

    def offsets(self) -> dict[str, tuple[int, int]]:
        out, o = {}, 0
        for (name, _), n in zip(self.entries, self.sizes):
            out[name] = (o, o + n)
            o += n
        return out

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Views into ``flat`` [..., numel] (no copy), shaped per entry with the leading batch dims kept."""
        if flat.shape[-1] != self.numel:
            raise ParamsError(f"parameter vector has {flat.shape[-1]} values, the layout needs {self.numel}")
        out, o = {}, 0
        lead = flat.shape[:-1]
        for (name, shape), n in zip(self.entries, self.sizes):
            out[name] = flat[..., o:o + n].reshape(*lead, *shape)
            o += n
        return out

    def flatten(self, params: dict[str, Tensor]) -> Tensor:
        missing = [n for n, _ in self.entries if n not in params]
        if missing:
            raise ParamsError(f"missing parameters {missing}")
        return torch.cat([params[n].reshape(-1) for n, _ in self.entries])



def layout_difference(a: FieldConfig, b: FieldConfig, a_name: str, b_name: str) -> str:
    """The field settings where two configs differ, e.g. ``log2_hashmap_size: file 12 vs config 11`` (the
    implementation does not count: tcnn and torch share one layout)."""
    return ", ".join(f"{k}: {a_name} {v} vs {b_name} {getattr(b, k)}" for k, v in asdict(a).items()
                     if k != "implementation" and getattr(b, k) != v)


def check_finite(flat: Tensor, what: str = "parameters") -> None:
    bad = (~torch.isfinite(flat)).sum().item()
    if bad:
        raise ParamsError(f"{what} contain {bad} NaN/inf values out of {flat.numel()}; refusing to use them "
                          "(refit the object, or lower the learning rate if fitting diverged)")


def _metadata(cfg: FieldConfig, extra: dict[str, Any] | None) -> dict[str, str]:
    meta = {
        "format": FORMAT,
        "layout_version": str(LAYOUT_VERSION),
        "layout_hash": cfg.layout_hash(),
        "field": json.dumps(asdict(cfg)),
    }
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    return meta


def params_to_bytes(flat: Tensor, cfg: FieldConfig, extra: dict[str, Any] | None = None) -> bytes:
    check_finite(flat)
    return st_save({"params": flat.detach().to("cpu", torch.float32).contiguous()}, metadata=_metadata(cfg, extra))


def save_params(path: str | Path, flat: Tensor, cfg: FieldConfig, extra: dict[str, Any] | None = None) -> None:
    Path(path).write_bytes(params_to_bytes(flat, cfg, extra))


def safetensors_metadata(data: bytes, source: str, error: type[Exception] = ParamsError) -> dict[str, str]:
    """The JSON metadata of safetensors bytes, read without trusting them; problems raise ``error``."""
    # safetensors' header is an 8-byte little-endian length followed by JSON.
    if len(data) < 8:
        raise error(f"{source}: not a safetensors file ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n <= 0 or n > len(data) - 8:
        raise error(f"{source}: not a safetensors file (bad header length)")
    try:
        header = json.loads(data[8:8 + n])
    except Exception as e:
        raise error(f"{source}: not a safetensors file ({e})") from None
    return header.get("__metadata__") or {}


def params_from_bytes(data: bytes, expected: FieldConfig | None = None, source: str = "params") -> tuple[Tensor, FieldConfig, dict[str, str]]:
    """Load a parameter file's bytes; checks the format, layout and values. Returns (flat, field config, meta)."""
    meta = safetensors_metadata(data, source)
    if meta.get("format") != FORMAT:
        raise ParamsError(f"{source}: not a p2n NeRF parameter file (format={meta.get('format')!r}); "
                          "did you pass a model checkpoint instead of params.safetensors?")
    if meta.get("layout_version") != str(LAYOUT_VERSION):
        raise ParamsError(f"{source}: layout version {meta.get('layout_version')} != {LAYOUT_VERSION} supported here")
    try:
        cfg = FieldConfig(**json.loads(meta["field"]))
    except Exception as e:
        raise ParamsError(f"{source}: unreadable field config in metadata ({e})") from None
    if expected is not None and cfg.layout_hash() != expected.layout_hash():
        raise ParamsError(f"{source}: parameter layout does not match the configured field: "
                          + layout_difference(cfg, expected, "file", "config"))
    try:
        flat = st_load(data)["params"]
    except Exception as e:
        raise ParamsError(f"{source}: corrupt safetensors data ({e})") from None
    from p2n.nerf.field import param_layout  # local: field imports this module

    n = param_layout(cfg).numel
    if flat.ndim != 1 or flat.numel() != n:
        raise ParamsError(f"{source}: holds {tuple(flat.shape)} values, its own field config needs ({n},)")
    check_finite(flat, f"{source}: parameters")
    return flat, cfg, meta


def load_params(path: str | Path, expected: FieldConfig | None = None) -> tuple[Tensor, FieldConfig, dict[str, str]]:
    p = Path(path)
    if not p.is_file():
        raise ParamsError(f"{p}: no such parameter file")
    return params_from_bytes(p.read_bytes(), expected, source=str(p))
