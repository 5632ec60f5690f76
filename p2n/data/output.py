"""Writing a dataset: checking the output location (fresh, or resumed), writing finished rows as shards that
appear whole or not at all, and the manifest.

Shards are named by a hash of the object ids they hold, so a retried batch (a worker died after writing) rewrites
the same file instead of adding a duplicate, and resuming skips every object that has a row.

Does not own: making rows (``build.py``) or scheduling the work (``ray_jobs/build_dataset.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

from p2n.config import P2NConfig
from p2n.data import storage
from p2n.data.errors import DataError
from p2n.data.manifest import make_manifest
from p2n.data.reader import list_shards, read_summary
from p2n.data.schema import FORMAT, MANIFEST, SHARD_PREFIX, SHARD_SUFFIX, SHARDS_DIR, arrow_schema, check_row
from p2n.nerf.field import param_layout

# Config sections whose change would make a resumed dataset inconsistent (dataset.* only says how to run), and
# the keys in them that only say where or how fast the same computation runs.
_FROZEN_SECTIONS = ("scene", "field", "render", "fit")
_FREE_KEYS = {"fit.num_threads", "fit.device", "field.implementation", "render.chunk_rays"}


@dataclass
class OutputState:
    uri: str
    storage_options: dict[str, Any]
    done: dict[str, str] = field(default_factory=dict)  # object_id -> status of rows already written
    created: str | None = None


def _plain(d: Any) -> Any:
    """JSON's view of a config dict (tuples become lists) so configs compare equal after a round trip."""
    if isinstance(d, dict):
        return {k: _plain(v) for k, v in d.items()}
    if isinstance(d, (list, tuple)):
        return [_plain(v) for v in d]
    return d


def prepare_output(uri: str, cfg: P2NConfig, resume: bool,
                   storage_options: dict[str, Any] | None = None) -> OutputState:
    """Check ``uri`` can take this build. A non-empty location needs ``resume``; resuming needs the same layout
    and fitting config. Returns which objects already have rows."""
    fs, root = storage.url_to_fs(uri, storage_options)
    state = OutputState(uri, dict(storage_options or {}))
    entries = storage.listdir(fs, root) if storage.exists(fs, root) else []
    if storage.exists(fs, root) and not fs.isdir(root):
        raise DataError(f"--out {uri} is a file; pass a folder (or a URI prefix) for the dataset")
    if not entries:
        return state
    if not resume:
        raise DataError(f"--out {uri} already exists and is not empty; pass --resume to continue that build, or "
                        f"choose another --out")
    shards = list_shards(fs, root)
    manifest_path = storage.join(root, MANIFEST)
    manifest = storage.read_json(fs, manifest_path, "--resume") if storage.exists(fs, manifest_path) else None
    if manifest is None and not shards:
        raise DataError(f"--out {uri} is not empty but holds no p2n dataset ({MANIFEST} or {SHARDS_DIR}/); choose "
                        f"another --out")
    if manifest is not None:
        if manifest.get("format") != FORMAT:
            raise DataError(f"--out {uri}: {MANIFEST} is not a p2n dataset manifest; choose another --out")
        state.created = manifest.get("created")
        old = (manifest.get("config") or {})
        now = _plain(cfg.to_dict())
        diff = [f"{sec}.{k}: {old[sec].get(k)!r} -> {v!r}" for sec in _FROZEN_SECTIONS if sec in old
                for k, v in now[sec].items() if _plain(old[sec].get(k)) != v and f"{sec}.{k}" not in _FREE_KEYS]
        if diff:
            raise DataError(f"--resume: this config differs from the one {uri} was built with ({'; '.join(diff[:6])}"
                            f"{'; ...' if len(diff) > 6 else ''}); pass the same --config/--set, or choose another "
                            f"--out")
    summary = read_summary(fs, shards)
    hashes = {r["layout_hash"] for r in summary}
    if hashes - {cfg.field.layout_hash()}:
        raise DataError(f"--resume: {uri} holds parameters of layout {sorted(hashes)}, this config's field has layout "
                        f"{cfg.field.layout_hash()}; pass the config the dataset was built with")
    state.done = {r["object_id"]: r["status"] for r in summary}
    _remove_stale_temporaries(fs, root)
    return state


def _remove_stale_temporaries(fs, root: str) -> None:
    """Half-written files a killed local run left behind (hidden names, never read as shards)."""
    for e in storage.listdir(fs, storage.join(root, SHARDS_DIR)):
        name = e["name"].rstrip("/").rsplit("/", 1)[-1]
        if name.startswith(f".{SHARD_PREFIX}") and ".tmp-" in name:
            fs.rm_file(e["name"])


def shard_name(object_ids: list[str]) -> str:
    digest = hashlib.sha256("\n".join(sorted(object_ids)).encode()).hexdigest()[:16]
    return f"{SHARDS_DIR}/{SHARD_PREFIX}{digest}{SHARD_SUFFIX}"


def rows_to_parquet(rows: list[dict[str, Any]]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for r in rows:
        check_row(r)
    table = pa.Table.from_pylist(rows, schema=arrow_schema())
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def write_shard(rows: list[dict[str, Any]], uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write ``rows`` as one shard under ``uri`` (atomically); returns its path relative to ``uri``."""
    if not rows:
        raise DataError("write_shard: no rows to write")
    fs, root = storage.url_to_fs(uri, storage_options)
    rel = shard_name([r["object_id"] for r in rows])
    storage.write_bytes_atomic(fs, storage.join(root, rel), rows_to_parquet(rows))
    return rel


def write_manifest(uri: str, cfg: P2NConfig, complete: bool, storage_options: dict[str, Any] | None = None,
                   created: str | None = None, source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Summarise every shard under ``uri`` into ``manifest.json`` (written atomically) and return it."""
    fs, root = storage.url_to_fs(uri, storage_options)
    shards = list_shards(fs, root)
    summary = read_summary(fs, shards)
    rel = [s[len(root):].lstrip("/") for s in shards]
    manifest = make_manifest(summary, rel, _plain(cfg.to_dict()), cfg.field.layout_hash(),
                             param_layout(cfg.field).numel, complete, created, source)
    storage.write_bytes_atomic(fs, storage.join(root, MANIFEST), json.dumps(manifest, indent=1).encode())
    return manifest
