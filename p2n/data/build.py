"""One object in, one dataset row out: list the objects to fit (procedural ids or a catalogue of transforms.json
folders), load an object's views, fit it from the shared initialization and serialise the result as a row of
``schema.COLUMNS``. A failing object (unreadable image, NaN fit, anything) becomes a ``status="failed"`` row with
the error text instead of stopping the run.

Plain functions with no Ray: ``ray_jobs/build_dataset.py`` runs :class:`ObjectFitter` inside its actors; tests
and notebooks call :func:`fit_object` directly.

Does not own: fitting maths (``p2n.nerf.fit``), reading transforms folders (``p2n.scenes``), writing shards
(``output.py``).
"""

from __future__ import annotations

import json
import logging
import os
import posixpath
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from typing import Any

from p2n.config import P2NConfig
from p2n.data import storage
from p2n.data.errors import DataError
from p2n.data.schema import SPLITS, STATUS_FAILED, STATUS_OK, cameras_to_json, check_row, encode_png
from p2n.nerf.field import init_params, param_layout
from p2n.nerf.fit import fit
from p2n.nerf.params import params_to_bytes
from p2n.scenes.colmap import MODEL_DIRS

log = logging.getLogger(__name__)

KIND_PROCEDURAL = "procedural"
KIND_FOLDER = "folder"
TRANSFORMS_NAMES = ("transforms_train.json", "transforms.json")  # what makes a folder one object ...
# ... or a COLMAP model (p2n.scenes.colmap): its cameras file in one of the places that module looks
COLMAP_MARKERS = tuple(posixpath.normpath(f"{d}/cameras.{ext}") for d in MODEL_DIRS for ext in ("bin", "txt"))


@dataclass(frozen=True)
class ObjectSource:
    """What to fit: a procedural catalogue id, or a folder (any fsspec URI) in the transforms.json format."""

    object_id: str
    kind: str = KIND_PROCEDURAL
    uri: str = ""  # the folder, for kind == "folder"

    def to_dict(self) -> dict[str, str]:
        return {"object_id": self.object_id, "kind": self.kind, "uri": self.uri}

    @classmethod
    def coerce(cls, value: "ObjectSource | dict | str") -> "ObjectSource":
        if isinstance(value, ObjectSource):
            return value
        if isinstance(value, str):
            return cls(value)
        return cls(str(value["object_id"]), str(value.get("kind") or KIND_PROCEDURAL), str(value.get("uri") or ""))


# ---- which objects ---------------------------------------------------------------------------------------------

def procedural_sources(cfg: P2NConfig, num_objects: int) -> list[ObjectSource]:
    """The first ``num_objects`` of the procedural catalogue (``p2n.scenes.catalogue``)."""
    from p2n.scenes import catalogue

    try:
        specs = catalogue(cfg.scene, num_objects, include_pairs=cfg.dataset.include_pairs)
    except ValueError as e:
        raise DataError(f"--num-objects {num_objects}: {e}") from None
    return [ObjectSource(s.object_id) for s in specs]


def catalogue_sources(uri: str, storage_options: dict[str, Any] | None = None) -> list[ObjectSource]:
    """One source per sub-folder of the catalogue at ``uri``; each must hold transforms.json or
    transforms_train.json (+ its images), or a COLMAP model beside ``images/``. The object id is the json's
    ``p2n.object_id`` (``p2n.json`` for a COLMAP folder), else the folder name."""
    fs, root = storage.url_to_fs(uri, storage_options)
    if not storage.exists(fs, root) or not fs.isdir(root):
        raise DataError(f"catalogue {uri} does not exist or is not a folder; pass a folder whose sub-folders each "
                        f"hold one object's transforms.json and images")
    try:
        files = fs.find(root)
    except OSError as e:
        raise DataError(f"cannot list catalogue {uri} ({e})") from None
    by_folder: dict[str, set[str]] = {}
    for f in files:
        parts = f[len(root):].strip("/").split("/")
        if len(parts) == 1 and parts[0] in TRANSFORMS_NAMES + ("transforms_test.json",):
            raise DataError(f"catalogue {uri} is itself one object ({parts[0]} at its top level); pass the folder "
                            f"that holds one sub-folder per object, or fit it alone with `p2n fit --data {uri}`")
        if len(parts) >= 2:
            by_folder.setdefault(parts[0], set()).add("/".join(parts[1:]))
    if not by_folder:
        raise DataError(f"catalogue {uri} has no object folders; it needs one sub-folder per object, each with "
                        f"transforms.json (or transforms_train.json) and its images")
    jsons = {}
    for name, contents in sorted(by_folder.items()):
        found = [t for t in TRANSFORMS_NAMES if t in contents]
        if not found and any(m in contents for m in COLMAP_MARKERS):
            found = ["p2n.json"]  # a COLMAP folder: its optional p2n.json names the object
        if not found:
            raise DataError(f"catalogue folder {uri.rstrip('/')}/{name} has no {' or '.join(TRANSFORMS_NAMES)} "
                            f"and no COLMAP model (sparse/0/cameras.bin); every sub-folder of a catalogue must "
                            f"hold one object (remove it or add its transforms)")
        jsons[name] = storage.join(root, name, found[0])
    raw = fs.cat(list(jsons.values()), on_error="return")
    sources = []
    for name, path in jsons.items():
        oid = name
        data = raw.get(path) if isinstance(raw, dict) else None
        if isinstance(data, bytes):
            try:
                doc = json.loads(data)
                block = (doc if jsons[name].endswith("/p2n.json") else doc.get("p2n")) or {}
                oid = str(block.get("object_id") or name) if isinstance(block, dict) else name
            except (ValueError, AttributeError):
                pass  # unreadable json: the object fails when it is fitted, with the reader's message
        sources.append(ObjectSource(oid, KIND_FOLDER, f"{uri.rstrip('/')}/{name}"))
    dupes = [k for k, n in Counter(s.object_id for s in sources).items() if n > 1]
    if dupes:
        raise DataError(f"catalogue {uri}: object id(s) {dupes[:5]} appear in more than one folder; give each "
                        f"folder a distinct p2n.object_id in its transforms json")
    return sources


# ---- one object ------------------------------------------------------------------------------------------------

@dataclass
class LoadedObject:
    object_id: str
    split: str
    captions: list[str]
    heldout_captions: list[str]
    train: Any  # Views
    test: Any  # Views


def load_object(source: ObjectSource, cfg: P2NConfig, storage_options: dict[str, Any] | None = None,
                workdir: str | None = None) -> LoadedObject:
    """Render (procedural) or read (folder; copied to ``workdir`` first when remote) an object's views."""
    if source.kind == KIND_PROCEDURAL:
        from p2n.scenes import render_object, spec_from_id

        spec = spec_from_id(source.object_id, cfg.scene)
        train, test = render_object(spec, cfg.scene)
        return LoadedObject(spec.object_id, spec.split, list(spec.captions), list(spec.heldout_captions), train, test)
    if source.kind != KIND_FOLDER:
        raise DataError(f"object {source.object_id}: unknown source kind {source.kind!r}")
    from p2n.scenes.source import from_folder

    fs, path = storage.url_to_fs(source.uri, storage_options)
    if storage.is_local(fs):
        local = path
    else:
        if workdir is None:
            raise DataError(f"object {source.object_id}: a remote folder needs a local working directory")
        local = os.path.join(workdir, path.rstrip("/").rsplit("/", 1)[-1])
        fs.get(path.rstrip("/") + "/", local + "/", recursive=True)
    obj = from_folder(local, cfg.scene)
    block = _p2n_block(local)
    split = next((s for s in (block.get("catalogue_split"), block.get("split")) if s in SPLITS), "train")
    heldout = block.get("heldout_captions") or []
    return LoadedObject(source.object_id, split, list(obj.captions), [str(c) for c in heldout], obj.train, obj.test)


def _p2n_block(folder: str) -> dict[str, Any]:
    for name in TRANSFORMS_NAMES:
        p = os.path.join(folder, name)
        if os.path.isfile(p):
            with open(p) as f:
                block = json.load(f).get("p2n") or {}
            return block if isinstance(block, dict) else {}
    return {}


class ObjectFitter:
    """Holds what every object shares (config, the shared initial parameters, the layout) and fits objects into
    dataset rows. One per worker; :meth:`fit` never raises for a bad object."""

    def __init__(self, cfg: P2NConfig, storage_options: dict[str, Any] | None = None):
        self.cfg = cfg
        self.storage_options = dict(storage_options or {})
        self.init = init_params(cfg.field, cfg.fit.init_seed)  # THE shared initialization
        self.num_params = param_layout(cfg.field).numel
        self.layout_hash = cfg.field.layout_hash()

    def fit(self, source: ObjectSource | dict | str) -> dict[str, Any]:
        source = ObjectSource.coerce(source)
        t0 = time.perf_counter()
        try:
            with tempfile.TemporaryDirectory(prefix="p2n-object-") as tmp:
                obj = load_object(source, self.cfg, self.storage_options, tmp)
                res = fit(obj.train, self.cfg, obj.test, init=self.init)
            meta = {"object_id": source.object_id, "captions": obj.captions, "psnr_test": res.psnr_test}
            row = {
                "object_id": source.object_id,
                "split": obj.split,
                "captions": obj.captions,
                "heldout_captions": obj.heldout_captions,
                "params": params_to_bytes(res.params, self.cfg.field, meta),
                "layout_hash": self.layout_hash,
                "num_params": int(res.params.numel()),
                "psnr_test": float(res.psnr_test),
                "psnr_train": float(res.psnr_train),
                "steps": int(res.steps),
                "seconds": time.perf_counter() - t0,
                "status": STATUS_OK,
                "error": "",
                "views_png": [encode_png(im) for im in obj.test.images],
                "cameras": cameras_to_json(obj.test.cameras),
            }
        except Exception as e:  # noqa: BLE001 - any failure of one object is recorded, the run goes on
            log.warning("object %s failed: %s\n%s", source.object_id, e, traceback.format_exc())
            row = failed_row(source, self.cfg, f"{type(e).__name__}: {e}", time.perf_counter() - t0)
        check_row(row)
        return row


def failed_row(source: ObjectSource, cfg: P2NConfig, error: str, seconds: float = 0.0) -> dict[str, Any]:
    split, captions, heldout = "train", [], []
    if source.kind == KIND_PROCEDURAL:
        try:
            from p2n.scenes import spec_from_id

            spec = spec_from_id(source.object_id, cfg.scene)
            split, captions, heldout = spec.split, list(spec.captions), list(spec.heldout_captions)
        except ValueError:
            pass
    return {
        "object_id": source.object_id, "split": split, "captions": captions, "heldout_captions": heldout,
        "params": b"",
        "layout_hash": cfg.field.layout_hash(), "num_params": 0, "psnr_test": float("nan"),
        "psnr_train": float("nan"), "steps": 0, "seconds": float(seconds), "status": STATUS_FAILED,
        "error": error or "unknown error", "views_png": [], "cameras": "",
    }


def fit_object(source: ObjectSource | dict | str, cfg: P2NConfig,
               storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit one object (a procedural id, an :class:`ObjectSource` or its dict) into a dataset row."""
    return ObjectFitter(cfg, storage_options).fit(source)
