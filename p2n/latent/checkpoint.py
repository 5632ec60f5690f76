"""Model files: safetensors weights with a JSON metadata header that says what kind of model they are.

Every p2n model file (``vae.safetensors``, ``align.safetensors``) carries ``kind`` (``p2n.vae``, ``p2n.align``),
``format_version`` and its configs in the header; loading checks the kind before reading any weights, so handing
the VAE file to the aligner loader (or a NeRF parameter file to either) is a clear ``WrongCheckpointKind``. Files
live on any fsspec URI (a local path, ``s3://...``); nothing is unpickled.

Does not own: what the weights are (``vae.py``, ``p2n/align/aligner.py``).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from p2n.data import storage
from p2n.errors import P2NError
from p2n.nerf.params import safetensors_metadata

FORMAT_VERSION = 1


class CheckpointError(P2NError):
    """A model file that is missing, unreadable, or was written by an incompatible version."""


class WrongCheckpointKind(CheckpointError):
    """A model file of another kind than the one asked for (e.g. the VAE where the aligner was expected)."""


def resolve(uri: str, filename: str) -> str:
    """``uri`` itself when it names a ``.safetensors`` file, else ``uri/filename`` (a checkpoint folder)."""
    uri = str(uri)
    return uri if uri.endswith(".safetensors") else uri.rstrip("/") + "/" + filename


def encode_meta(meta: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def decode_meta(meta: dict[str, str], keys_json: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = dict(meta)
    for k in keys_json:
        if k in out:
            out[k] = json.loads(out[k])
    return out


def to_bytes(tensors: dict[str, Tensor], kind: str, meta: dict[str, Any]) -> bytes:
    header = encode_meta({"kind": kind, "format_version": str(FORMAT_VERSION), **meta})
    return st_save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=header)


def save_file(uri: str, tensors: dict[str, Tensor], kind: str, meta: dict[str, Any],
              storage_options: dict[str, Any] | None = None) -> str:
    """Write a model file (atomically on local disks) and return the URI written."""
    fs, path = storage.url_to_fs(uri, storage_options)
    storage.write_bytes_atomic(fs, path, to_bytes(tensors, kind, meta))
    return uri


def read_header(data: bytes, source: str) -> dict[str, str]:
    return safetensors_metadata(data, source, CheckpointError)


def from_bytes(data: bytes, kind: str, source: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    meta = read_header(data, source)
    found = meta.get("kind") or meta.get("format")
    if found != kind:
        what = {"p2n.vae": "a VAE (vae.safetensors)", "p2n.align": "an aligner (align.safetensors)",
                "p2n.nerf": "NeRF parameters (params.safetensors)"}.get(str(found), f"kind={found!r}")
        raise WrongCheckpointKind(f"{source} is {what}, not the {kind} model this loader needs; pass the --out "
                                  f"folder of `p2n train {'vae' if kind == 'p2n.vae' else 'align'}`")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CheckpointError(f"{source}: format version {meta.get('format_version')} is not the {FORMAT_VERSION} "
                              "this p2n reads; retrain or use the matching p2n version")
    try:
        tensors = st_load(data)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{source}: corrupt safetensors data ({e})") from None
    return tensors, meta


def load_file(uri: str, kind: str, storage_options: dict[str, Any] | None = None
              ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Read a model file of ``kind``: (tensors, raw metadata strings). Raises WrongCheckpointKind/CheckpointError."""
    fs, path = storage.url_to_fs(uri, storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"no model file at {uri}; pass the --out folder of a finished `p2n train` run "
                              "(it holds vae.safetensors / align.safetensors)") from None
    except IsADirectoryError:
        raise CheckpointError(f"{uri} is a folder; expected a .safetensors file") from None
    except NotADirectoryError:  # a plain file given where a checkpoint folder was expected
        folder = str(uri).rsplit("/", 1)[0]
        raise CheckpointError(f"no model file at {uri}: {folder} is not a folder") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {uri} ({e.strerror or e})") from None
    return from_bytes(data, kind, uri)


def same_tensors(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
