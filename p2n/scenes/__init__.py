"""Scenes: the procedural object catalogue (specs, captions, splits), its analytic renderer, and posed image sets
on disk in the transforms.json format. See each module's docstring for what it owns."""

from p2n.scenes.catalogue import (
    ObjectSpec,
    Primitive,
    catalogue,
    heldout_combos,
    pair_id,
    resolve_scene,
    single_id,
    spec_from_id,
)
from p2n.scenes.render import render_object, render_views
from p2n.scenes.transforms import (
    DatasetError,
    export_object,
    normalize_cameras,
    read_image,
    read_transforms,
    write_transforms,
)
from p2n.scenes.vocab import COLORS, RELATIONS, SHAPE_WORDS

__all__ = [
    "COLORS", "RELATIONS", "SHAPE_WORDS", "DatasetError", "ObjectSpec", "Primitive", "catalogue", "export_object",
    "heldout_combos", "normalize_cameras", "pair_id", "read_image", "read_transforms", "render_object",
    "render_views", "resolve_scene", "single_id", "spec_from_id", "write_transforms",
]
