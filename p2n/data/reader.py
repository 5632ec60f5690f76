"""Reading a p2n NeRF dataset (local folder or any fsspec URI) without Ray: the manifest, rows as dicts or a
pandas frame, and a row's parameters and held-out views as p2n objects.

    from p2n.data import open_dataset, row_params, row_views
    ds = open_dataset("s3://bucket/ds")            # storage_options=... for an S3-compatible endpoint
    for row in ds.rows(split="train"):             # status="ok" rows by default
        flat, field_cfg = row_params(row, expected_field_cfg=cfg.field)
        views = row_views(row)                     # p2n.cameras.Views of the held-out test views

Does not own: the schema (``schema.py``) or how rows are made (``build.py``).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from torch import Tensor

from p2n.cameras import Views
from p2n.config import FieldConfig, P2NConfig
from p2n.data import storage
from p2n.data.errors import DataError
from p2n.data.manifest import make_manifest
from p2n.data.schema import (
    COLUMNS,
    FORMAT,
    MANIFEST,
    SHARD_PREFIX,
    SHARD_SUFFIX,
    SHARDS_DIR,
    STATUS_OK,
    SUMMARY_COLUMNS,
    cameras_from_json,
    decode_png,
)
from p2n.nerf.params import params_from_bytes


def list_shards(fs, root: str) -> list[str]:
    """Full paths of the complete shards under ``root/shards`` (temporary files are hidden and skipped)."""
    out = []
    for e in storage.listdir(fs, storage.join(root, SHARDS_DIR)):
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if e.get("type") == "file" and name.startswith(SHARD_PREFIX) and name.endswith(SHARD_SUFFIX):
            out.append(e["name"])
    return sorted(out)


def read_columns(fs, shards: list[str], columns: list[str] | None = None):
    """The given columns of ``shards`` as one ``pyarrow.Table`` (empty, with the schema, when there are none)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from p2n.data.schema import arrow_schema

    if columns is not None:
        unknown = set(columns) - set(COLUMNS)
        if unknown:
            raise DataError(f"unknown dataset column(s) {sorted(unknown)}; columns: {list(COLUMNS)}")
    if not shards:
        schema = arrow_schema()
        return pa.schema([schema.field(c) for c in columns]).empty_table() if columns else schema.empty_table()
    try:
        return pq.read_table(shards, filesystem=fs, columns=columns, schema=arrow_schema())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read dataset shards under {shards[0].rsplit('/', 1)[0]} ({e})") from None


def read_summary(fs, shards: list[str]) -> list[dict[str, Any]]:
    """The summary columns of every row, as dicts (cheap: no parameters or pictures are read)."""
    return read_columns(fs, shards, SUMMARY_COLUMNS).to_pylist()


class DatasetReader:
    """A dataset at ``uri``: ``manifest`` (dict), ``to_pandas()``, ``rows()``; see the module docstring."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = storage.url_to_fs(self.uri, self.storage_options)
        self.shards = list_shards(self.fs, self.root)
        manifest_path = storage.join(self.root, MANIFEST)
        if storage.exists(self.fs, manifest_path):
            self.manifest = storage.read_json(self.fs, manifest_path, f"dataset {self.uri}")
            if self.manifest.get("format") != FORMAT:
                raise DataError(f"{self.uri}/{MANIFEST} is not a p2n dataset manifest "
                                f"(format={self.manifest.get('format')!r})")
        elif self.shards:  # a build that was cut off before writing its manifest: compute one
            summary = read_summary(self.fs, self.shards)
            first = next((r for r in summary if r["status"] == STATUS_OK), None)
            rel = [s[len(self.root):].lstrip("/") for s in self.shards]
            self.manifest = make_manifest(summary, rel, None, first and first["layout_hash"],
                                          first and first["num_params"], complete=False)
        else:
            raise DataError(f"no p2n dataset at {self.uri}: neither {MANIFEST} nor {SHARDS_DIR}/*.parquet there; "
                            f"build one with `p2n dataset build --out {self.uri}`")

    def __repr__(self) -> str:
        c = self.manifest.get("counts", {})
        return f"DatasetReader({self.uri!r}, ok={c.get('ok')}, failed={c.get('failed')}, shards={len(self.shards)})"

    @property
    def config(self) -> P2NConfig | None:
        """The config the objects were fitted with (None for a cut-off build without a manifest)."""
        d = self.manifest.get("config")
        return None if d is None else P2NConfig.from_dict(d)

    @property
    def field_config(self) -> FieldConfig | None:
        cfg = self.config
        return None if cfg is None else cfg.field

    def to_pandas(self, columns: list[str] | None = None):
        """Every row (failed ones included) as a pandas DataFrame; ``columns`` limits what is read."""
        return read_columns(self.fs, self.shards, columns).to_pandas()

    def rows(self, split: str | None = None, status: str | None = STATUS_OK,
             columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Rows as dicts, one shard at a time; ``split``/``status`` filter (None: all)."""
        cols = None if columns is None else list(dict.fromkeys([*columns, "split", "status"]))
        for shard in self.shards:
            for row in read_columns(self.fs, [shard], cols).to_pylist():
                if (split is None or row["split"] == split) and (status is None or row["status"] == status):
                    yield row

    def object_ids(self, split: str | None = None, status: str | None = STATUS_OK) -> list[str]:
        return [r["object_id"] for r in self.rows(split, status, columns=["object_id"])]


def open_dataset(uri: str, storage_options: dict[str, Any] | str | None = None) -> DatasetReader:
    """Open the dataset at ``uri`` (``storage_options``: fsspec options, a dict or a JSON string)."""
    return DatasetReader(uri, storage.parse_storage_options(storage_options))


def _get(row: Mapping[str, Any], key: str) -> Any:
    try:
        return row[key]
    except KeyError:
        raise DataError(f"dataset row has no {key!r} column; read it with all columns (columns=None)") from None


def row_params(row: Mapping[str, Any], expected_field_cfg: FieldConfig | None = None) -> tuple[Tensor, FieldConfig]:
    """A row's NeRF parameters: (flat float32 vector [P], the field config they were fitted for).

    ``expected_field_cfg``: refuse a row whose layout differs (the error names the differing fields).
    """
    oid = _get(row, "object_id")
    data = _get(row, "params")
    if _get(row, "status") != STATUS_OK or not data:
        raise DataError(f"object {oid} has no parameters (status={row['status']!r}: {row.get('error') or '-'}); "
                        f"filter rows with status='ok'")
    flat, cfg, _ = params_from_bytes(bytes(data), expected_field_cfg, source=f"dataset row {oid}")
    return flat, cfg


def row_views(row: Mapping[str, Any]) -> Views:
    """A row's stored held-out views (straight RGBA [N, H, W, 4] in [0, 1]) with their cameras."""
    oid = _get(row, "object_id")
    pngs = list(_get(row, "views_png"))
    if not pngs:
        raise DataError(f"object {oid} has no stored views (status={row.get('status')!r})")
    cameras = cameras_from_json(_get(row, "cameras"), f"dataset row {oid}")
    images = torch.stack([decode_png(p, f"dataset row {oid} view {i}") for i, p in enumerate(pngs)])
    try:
        return Views(images, cameras)
    except ValueError as e:
        raise DataError(f"dataset row {oid}: views and cameras disagree ({e})") from None
