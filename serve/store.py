"""The artefact store of the service: a folder or an fsspec URI that outlives every replica.

Refinement jobs keep their request, state, checkpoints and results here, and artefacts delivered as URLs are
written here and read back by whichever ingress replica serves the download. Keys are ``/``-separated paths
relative to the store root (``jobs/<id>/state.json``). Every write is atomic (``p2n.data.storage``), so a reader
never sees half a file, even when the writer dies mid-write.

Does not own: what the files mean (``serve/jobs.py``, ``serve/app.py``) or fsspec plumbing
(``p2n.data.storage``: S3 settings from the AWS environment, atomic writes).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from p2n.data import storage


class ArtefactStore:
    """``write``/``read``/``exists``/``list``/``delete`` over keys under one root (local folder or URI)."""

    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = str(uri)
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = storage.url_to_fs(self.uri, self.storage_options)
        if self.is_local:
            self.root = os.path.abspath(self.root)
        self.fs.makedirs(self.root, exist_ok=True)

    @property
    def is_local(self) -> bool:
        return storage.is_local(self.fs)

    def path(self, key: str) -> str:
        parts = [p for p in key.split("/") if p]
        if any(p in (".", "..") for p in parts):
            raise ValueError(f"bad store key {key!r}")
        return storage.join(self.root, *parts)

    def local_path(self, key: str) -> Path | None:
        """A real path on this machine for ``key`` when the store is a local folder (None for object stores)."""
        return Path(self.path(key)) if self.is_local else None

    # ---- bytes and JSON -----------------------------------------------------------------------------------
    def write(self, key: str, data: bytes) -> None:
        storage.write_bytes_atomic(self.fs, self.path(key), data)

    def read(self, key: str) -> bytes:
        """The bytes at ``key``; FileNotFoundError when there are none."""
        path = self.path(key)
        self.fs.invalidate_cache(path)
        return self.fs.cat_file(path)

    def write_json(self, key: str, doc: Any) -> None:
        self.write(key, json.dumps(doc, default=float).encode())

    def read_json(self, key: str) -> Any:
        return json.loads(self.read(key))

    def exists(self, key: str) -> bool:
        return storage.exists(self.fs, self.path(key))

    def list(self, key: str) -> list[str]:
        """Names directly under ``key`` (files and folders); [] when it does not exist."""
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in storage.listdir(self.fs, self.path(key)))

    def delete(self, key: str) -> None:
        path = self.path(key)
        try:
            self.fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(path)

    # ---- folders (refinement checkpoints on object stores) ------------------------------------------------
    def upload_dir(self, local: Path, key: str) -> None:
        """Copy every file under ``local`` to ``key/`` (each file atomically)."""
        for f in sorted(Path(local).rglob("*")):
            if f.is_file():
                self.write(f"{key}/{f.relative_to(local).as_posix()}", f.read_bytes())

    def download_dir(self, key: str, local: Path) -> bool:
        """Copy ``key/`` into ``local`` (replacing it); False when the store has nothing there."""
        base = self.path(key)
        self.fs.invalidate_cache(base)
        try:
            files = [p for p in self.fs.find(base) if not p.rstrip("/").endswith("/")]
        except FileNotFoundError:
            files = []
        if not files:
            return False
        local = Path(local)
        shutil.rmtree(local, ignore_errors=True)
        prefix = self.fs._strip_protocol(base).rstrip("/") + "/"
        for p in files:
            rel = self.fs._strip_protocol(p)[len(prefix):]
            dest = local / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(self.fs.cat_file(p))
        return True
