"""The on-disk contract of a p2n NeRF dataset: its folder layout, the row schema of its parquet shards, and how
views and cameras are encoded in a row. Writers (``build.py``, the Ray job) and readers (``reader.py``, the
training stage) both take names and types from here, so they cannot drift apart.

Layout at the dataset URI (a local folder or any fsspec URI such as ``s3://bucket/ds``)::

    manifest.json                      config, layout, counts, splits, failures, shard list (written last)
    shards/part-<16 hex>.parquet       one or more rows (objects) each; the name hashes the object ids it holds

Shards live in a sub-folder so that ``pandas.read_parquet(URI + "/shards")`` and
``ray.data.read_parquet(URI)`` both read them without tripping over ``manifest.json``.

Does not own: fitting (``p2n.nerf.fit``), parameter bytes (``p2n.nerf.params``), or where I/O goes
(``storage.py``).
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from p2n.cameras import Cameras
from p2n.data.errors import DataError
from p2n.viz import to_uint8

FORMAT = "p2n.dataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARDS_DIR = "shards"
SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"

STATUS_OK = "ok"
STATUS_FAILED = "failed"
SPLITS = ("train", "heldout")

# name -> arrow type (as text: pyarrow is only imported where parquet is actually read or written).
COLUMNS: dict[str, str] = {
    "object_id": "string",
    "split": "string",  # "train" / "heldout"
    "captions": "list<string>",
    "heldout_captions": "list<string>",
    "params": "binary",  # p2n.nerf.params.params_to_bytes(flat, cfg.field, meta); b"" when failed
    "layout_hash": "string",  # cfg.field.layout_hash()
    "num_params": "int64",  # 0 when failed
    "psnr_test": "double",  # mean over the stored held-out views; NaN when failed
    "psnr_train": "double",
    "steps": "int32",
    "seconds": "double",  # wall-clock of this object's fit, reading its views included
    "status": "string",  # "ok" / "failed"
    "error": "string",  # "" when ok
    "views_png": "list<binary>",  # held-out test views, RGBA PNG each
    "cameras": "string",  # JSON, see cameras_to_json
}
# What the driver, resume and `p2n dataset info` read without touching params or pictures.
SUMMARY_COLUMNS = ["object_id", "split", "status", "error", "psnr_test", "psnr_train", "steps", "seconds",
                   "layout_hash", "num_params"]


def arrow_schema():
    """The row schema as a ``pyarrow.Schema``."""
    import pyarrow as pa

    types = {"string": pa.string(), "binary": pa.binary(), "int64": pa.int64(), "int32": pa.int32(),
             "double": pa.float64(), "list<string>": pa.list_(pa.string()), "list<binary>": pa.list_(pa.binary())}
    return pa.schema([(name, types[t]) for name, t in COLUMNS.items()])


def check_row(row: dict[str, Any]) -> None:
    """A row has exactly the schema's columns (a writer bug otherwise, so this is an assertion-like check)."""
    missing, extra = set(COLUMNS) - set(row), set(row) - set(COLUMNS)
    if missing or extra:
        raise DataError(f"dataset row for {row.get('object_id')!r} has missing columns {sorted(missing)} "
                        f"and unknown columns {sorted(extra)}")


# ---- views and cameras in a row ----------------------------------------------------------------------------------

def encode_png(image: Tensor) -> bytes:
    """One straight-alpha RGBA image [H, W, 4] in [0, 1] as PNG bytes (8 bits a channel)."""
    buf = io.BytesIO()
    Image.fromarray(to_uint8(image), mode="RGBA").save(buf, format="PNG")
    return buf.getvalue()


def decode_png(data: bytes, where: str = "view") -> Tensor:
    """PNG bytes as straight-alpha RGBA float32 [H, W, 4] in [0, 1]."""
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            rgba = np.asarray(im.convert("RGBA"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{where} is not a readable PNG ({e}); rebuild this object") from None
    return torch.from_numpy(rgba)


def cameras_to_json(cameras: Cameras) -> str:
    return json.dumps({
        "c2w": cameras.c2w.tolist(), "fx": cameras.fx.tolist(), "fy": cameras.fy.tolist(),
        "cx": cameras.cx.tolist(), "cy": cameras.cy.tolist(), "width": cameras.width, "height": cameras.height,
    })


def cameras_from_json(text: str, where: str = "cameras") -> Cameras:
    try:
        d = json.loads(text)
        return Cameras(torch.tensor(d["c2w"], dtype=torch.float32).reshape(-1, 4, 4),
                       torch.tensor(d["fx"]), torch.tensor(d["fy"]), torch.tensor(d["cx"]), torch.tensor(d["cy"]),
                       int(d["width"]), int(d["height"]))
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise DataError(f"{where}: unreadable cameras JSON ({type(e).__name__}: {e})") from None
