"""Batch generation to storage: a prompts file in, one parquet row per prompt out, written as shards to a folder
or any fsspec URI (``s3://...``). Resumable. This is the per-worker code of ``ray_jobs/generate_batch.py``
(``p2n generate-batch``); it never imports Ray.

A row: ``index`` (the prompt's position among the file's non-blank lines), ``prompt``, ``status`` (``ok`` or
``failed``), ``error``, ``params`` (the bytes of a ``params.safetensors`` file: the NeRF, layout metadata and the
checkpoint it came from), ``views_png`` (``batch.views`` renders of it side by side, PNG bytes; null with 0 views),
``generate_ms`` (the batch's forward pass, per prompt) and ``render_ms``.

A batch of prompts is one forward pass and one shard, named by a hash of its indices: a batch retried after its
worker died rewrites the same file, and a resumed run skips every index that has a row. A prompt the encoder
refuses (empty, too long, control characters) becomes a ``failed`` row with the reason; the rest of its batch is
generated. ``manifest.json`` at the end records the checkpoint, the prompts file and the counts.

Does not own: the forward pass (``p2n.generate``), storage primitives (``p2n.data.storage``), scheduling (Ray).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from datetime import datetime, timezone
from typing import Any, Sequence

from p2n.config import P2NConfig
from p2n.data import storage
from p2n.errors import P2NError

SHARDS_DIR = "shards"
MANIFEST = "manifest.json"
KIND = "p2n.generations"
STATUS_OK, STATUS_FAILED = "ok", "failed"
COLUMNS = ("index", "prompt", "status", "error", "params", "views_png", "generate_ms", "render_ms")
MAX_PROMPTS_BYTES = 256 * 1024 * 1024


class BatchError(P2NError):
    """Input or output of a batch generation run that cannot be used as given."""


def read_prompts(uri: str, storage_options: dict[str, Any] | None = None) -> list[str]:
    """The non-blank lines of a UTF-8 text file (local or fsspec URI), stripped; a byte-order mark is dropped."""
    fs, path = storage.url_to_fs(uri, storage_options)
    try:
        size = fs.size(path)
        if size is not None and size > MAX_PROMPTS_BYTES:
            raise BatchError(f"{uri}: {size} bytes > {MAX_PROMPTS_BYTES}; split the prompts into several files")
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BatchError(f"prompts file {uri} not found") from None
    except IsADirectoryError:
        raise BatchError(f"prompts file {uri} is a folder; pass a text file with one prompt per line") from None
    except OSError as e:  # no permission, a broken link, a storage error
        raise BatchError(f"prompts file {uri}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise BatchError(f"{uri} is not UTF-8 text ({e}); save it as UTF-8, one prompt per line") from None
    prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not prompts:
        raise BatchError(f"{uri} has no prompts (every line is blank)")
    return prompts


def shard_name(indices: Sequence[int]) -> str:
    digest = hashlib.sha1(",".join(str(int(i)) for i in sorted(indices)).encode()).hexdigest()[:16]
    return f"{SHARDS_DIR}/part-{digest}.parquet"


def existing_rows(out_uri: str, storage_options: dict[str, Any] | None = None) -> dict[int, str]:
    """``index -> status`` of every row already written under ``out_uri`` (empty for a new output)."""
    rows = _read_shards(out_uri, storage_options, ["index", "status"])
    return {} if rows is None else {r["index"]: r["status"] for r in rows}


def prepare_output(out_uri: str, resume: bool, storage_options: dict[str, Any] | None = None) -> dict[int, str]:
    """Check ``out_uri`` is new (or, with ``resume``, a batch output); return the rows already there."""
    fs, root = storage.url_to_fs(out_uri, storage_options)
    manifest = storage.join(root, MANIFEST)
    if storage.exists(fs, manifest):
        kind = storage.read_json(fs, manifest, "manifest").get("kind")
        if kind != KIND:
            raise BatchError(f"{out_uri} holds something else ({kind!r}, not {KIND}); choose another --out")
    done = existing_rows(out_uri, storage_options)
    if (done or storage.exists(fs, manifest)) and not resume:
        raise BatchError(f"{out_uri} already holds {len(done)} generated rows; pass --resume to continue it or "
                         f"choose another --out")
    return done


def write_manifest(out_uri: str, storage_options: dict[str, Any] | None, *, ckpt: str, prompts_uri: str,
                   total: int, complete: bool, cfg: P2NConfig, created: str | None = None) -> dict[str, Any]:
    done = existing_rows(out_uri, storage_options)
    manifest = {
        "kind": KIND, "checkpoint": ckpt, "prompts": prompts_uri, "prompts_total": total,
        "rows": len(done), "ok": sum(s == STATUS_OK for s in done.values()),
        "failed": sum(s == STATUS_FAILED for s in done.values()), "complete": complete,
        "created": created or _now(), "updated": _now(), "batch": cfg.to_dict()["batch"],
    }
    fs, root = storage.url_to_fs(out_uri, storage_options)
    storage.write_bytes_atomic(fs, storage.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest


def read_generations(out_uri: str, storage_options: dict[str, Any] | None = None,
                     columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Every row under ``out_uri`` in prompt order (``params`` as safetensors bytes: ``params_from_bytes``)."""
    rows = _read_shards(out_uri, storage_options, list(columns) if columns else None)
    if rows is None:
        raise BatchError(f"{out_uri} has no {SHARDS_DIR}/ folder: not the output of a batch generation run")
    return sorted(rows, key=lambda r: r["index"])


def _read_shards(out_uri: str, storage_options: dict[str, Any] | None,
                 columns: list[str] | None) -> list[dict[str, Any]] | None:
    """The rows of every shard under ``out_uri`` (``columns`` only), or None when it has no shards folder."""
    import pyarrow.parquet as pq

    fs, root = storage.url_to_fs(out_uri, storage_options)
    shards_dir = storage.join(root, SHARDS_DIR)
    if not storage.exists(fs, shards_dir):
        return None
    rows: list[dict[str, Any]] = []
    for entry in storage.listdir(fs, shards_dir):
        if entry["name"].endswith(".parquet"):  # not the temporary file of an interrupted atomic write
            with fs.open(entry["name"], "rb") as f:
                rows += pq.read_table(f, columns=columns).to_pylist()
    return rows


class BatchGenerator:
    """Holds a loaded :class:`p2n.generate.Generator`; each call turns one batch of prompts into one shard."""

    def __init__(self, ckpt: str, cfg: P2NConfig, out_uri: str, storage_options: dict[str, Any] | None = None,
                 device: str = "auto"):
        from p2n.generate import Generator

        self.gen = Generator.load(ckpt, cfg, device, storage_options)
        self.ckpt, self.out_uri, self.storage_options = ckpt, out_uri, storage_options or {}
        self.views = cfg.batch.views
        self.cameras = self.gen.ring(self.views, cfg.batch.view_size) if self.views > 0 else None

    def __call__(self, indices: Sequence[int], prompts: Sequence[str]) -> list[dict[str, Any]]:
        """Generate, render and write one shard; returns each row without its blobs (for progress and counts)."""
        from p2n.align.errors import PromptError

        encoder = self.gen.text_encoder
        rows: list[dict[str, Any]] = []
        valid: list[tuple[int, str]] = []
        for i, p in zip(indices, prompts):
            try:
                valid.append((len(rows), encoder.validate_prompt(p)))
                rows.append(self._row(int(i), p))
            except PromptError as e:
                rows.append(self._row(int(i), p, error=str(e)))
        if valid:
            result = self.gen.from_prompts([p for _, p in valid])
            per_prompt_ms = result.generate_ms / len(valid)
            for (k, _), params in zip(valid, result.params):
                self._fill(rows[k], params, per_prompt_ms)
        rel = shard_name([r["index"] for r in rows])
        fs, root = storage.url_to_fs(self.out_uri, self.storage_options)
        storage.write_bytes_atomic(fs, storage.join(root, rel), _to_parquet(rows))
        return [{k: r[k] for k in COLUMNS if k not in ("params", "views_png")} | {"shard": rel} for r in rows]

    @staticmethod
    def _row(index: int, prompt: str, error: str | None = None) -> dict[str, Any]:
        return {"index": index, "prompt": prompt, "status": STATUS_FAILED if error else STATUS_OK, "error": error,
                "params": None, "views_png": None, "generate_ms": None, "render_ms": None}

    def _fill(self, row: dict[str, Any], params, generate_ms: float) -> None:
        from p2n.nerf.params import ParamsError, params_to_bytes

        try:
            row["params"] = params_to_bytes(params, self.gen.cfg.field, {"prompt": row["prompt"],
                                                                         "checkpoint": self.ckpt})
        except ParamsError as e:  # non-finite parameters (a broken checkpoint): reported per row
            row.update(status=STATUS_FAILED, error=f"generated parameters are unusable: {e}")
            return
        row["generate_ms"] = round(generate_ms, 3)
        if self.cameras is not None:
            from p2n.viz import image_grid

            t = time.perf_counter()
            rgb = self.gen.render(params, self.cameras)
            buf = io.BytesIO()
            image_grid([list(rgb)]).save(buf, format="PNG")
            row["views_png"] = buf.getvalue()
            row["render_ms"] = round((time.perf_counter() - t) * 1000, 1)


def _to_parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("index", pa.int64()), ("prompt", pa.string()), ("status", pa.string()),
                        ("error", pa.string()), ("params", pa.binary()), ("views_png", pa.binary()),
                        ("generate_ms", pa.float64()), ("render_ms", pa.float64())])
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf)
    return buf.getvalue()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
