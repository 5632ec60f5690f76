"""Where dataset bytes go: every read and write of a dataset or catalogue goes through fsspec, so a local folder
and ``s3://bucket/prefix`` (s3fs) behave alike.

S3 settings come from the standard AWS environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_DEFAULT_REGION``/``AWS_REGION``, ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` for
an S3-compatible store) and from optional fsspec storage options, e.g.
``{"client_kwargs": {"endpoint_url": "http://minio:9000"}}``; explicit options win over the environment.

Does not own: what the bytes mean (``schema.py``).
"""

from __future__ import annotations

import json
import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from p2n.data.errors import DataError

_S3_PROTOCOLS = ("s3", "s3a")


def parse_storage_options(value: str | dict | None) -> dict[str, Any]:
    """``--storage-options`` JSON (or an already parsed dict) as fsspec keyword arguments."""
    if value is None or value == "":
        return {}
    if isinstance(value, dict):
        return dict(value)
    try:
        opts = json.loads(value)
    except json.JSONDecodeError as e:
        raise DataError(f"--storage-options is not valid JSON ({e.msg} at column {e.colno}): {value!r}; pass an "
                        "object such as '{\"client_kwargs\": {\"endpoint_url\": \"http://minio:9000\"}}'") from None
    if not isinstance(opts, dict):
        raise DataError(f"--storage-options must be a JSON object of fsspec options, got {type(opts).__name__}: "
                        f"{value!r}")
    return opts


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else "file"


def absolute(uri: str | None) -> str | None:
    """A local path made absolute (URIs with a scheme other than ``file`` unchanged). Ray workers do not run in
    the driver's working directory, so a relative ``--out`` would land somewhere else."""
    if not uri or "://" in uri:
        return uri
    return os.path.abspath(os.path.expanduser(uri))


def _with_env(uri: str, opts: dict[str, Any]) -> dict[str, Any]:
    """Fill an S3 endpoint from the AWS environment when the options name none (older botocore ignores it)."""
    if protocol_of(uri) not in _S3_PROTOCOLS:
        return opts
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in opts and "endpoint_url" not in (opts.get("client_kwargs") or {}):
        opts = {**opts, "endpoint_url": endpoint}
    return opts


def url_to_fs(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem for ``uri`` and the path inside it (no protocol, no trailing slash)."""
    if not uri or not str(uri).strip():
        raise DataError("empty dataset location; pass a folder or a URI such as s3://bucket/ds")
    uri = str(uri)
    opts = _with_env(uri, dict(storage_options or {}))
    try:
        fs, path = fsspec.core.url_to_fs(uri, **opts)
    except (ImportError, ValueError, TypeError) as e:
        raise DataError(f"cannot open {uri} ({type(e).__name__}: {e}); check the URI scheme and --storage-options"
                        ) from None
    return fs, path.rstrip("/") or path


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def join(path: str, *parts: str) -> str:
    return posixpath.join(path, *parts)


def exists(fs: fsspec.AbstractFileSystem, path: str) -> bool:
    fs.invalidate_cache(path)
    return fs.exists(path)


def listdir(fs: fsspec.AbstractFileSystem, path: str) -> list[dict[str, Any]]:
    """Entries directly under ``path`` (fresh, not from a listings cache); [] when it does not exist."""
    fs.invalidate_cache(path)
    try:
        return fs.ls(path, detail=True)
    except FileNotFoundError:
        return []


def write_bytes_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the whole file or nothing.

    Locally: a hidden temporary name beside the target, then a rename (atomic on one filesystem). On object
    stores a single PUT (or a completed multipart upload) is atomic, so the bytes go straight to ``path``.
    """
    if is_local(fs):
        local = fs._strip_protocol(path)
        os.makedirs(os.path.dirname(local) or ".", exist_ok=True)
        tmp = os.path.join(os.path.dirname(local), f".{os.path.basename(local)}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    else:
        fs.pipe_file(path, data)
    fs.invalidate_cache(path)


def read_json(fs: fsspec.AbstractFileSystem, path: str, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(fs.cat_file(path))
    except FileNotFoundError:
        raise DataError(f"{what}: {path} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{what}: {path} is not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise DataError(f"{what}: {path} holds a JSON {type(doc).__name__}, expected an object")
    return doc
