"""The procedural object catalogue: coloured primitives and two-object compositions that stand in for a real 3D
dataset offline, with readable ids, captions and a train / held-out split.

Object ids are the source of truth and round-trip (``spec_from_id(spec.object_id, cfg) == spec``):

    single/{colour}/{shape}/s{size}-p{pose}      e.g. single/red/cube/s1-p0
    pair/{colour}-{shape}/{relation}/{colour}-{shape}/v{variant}   e.g. pair/red-cube/on/blue-sphere/v0

Held-out split: a seeded ``cfg.heldout_fraction`` share of colour x shape *combinations* is held out, and every
object containing one of them (single or pair) has ``split == "heldout"``, so those combinations never reach
training. Every colour and every shape keeps at least one training combination.

Owns object specs, layout and ordering. Does not own rendering (:mod:`p2n.scenes.render`), caption wording
(:mod:`p2n.scenes.captions`) or shape geometry (:mod:`p2n.scenes.sdf`).
"""

from __future__ import annotations

from p2n.errors import SceneError

import functools
import math
import re
from dataclasses import dataclass

from p2n.config import SceneConfig
from p2n.scenes.captions import pair_captions, parse_caption, single_captions, stable_hash
from p2n.scenes.sdf import SHAPES
from p2n.scenes.vocab import COLORS, RELATIONS, SHAPE_WORDS

SPLITS = ("train", "heldout")
SINGLE_SIZES = (0.6, 0.75, 0.9)  # s0, s1, s2: the scale of the unit shape
# p0..p3: (yaw about +Z in degrees, centre offset). Offsets stay small so size 0.9 still fits in [-1, 1]^3.
SINGLE_POSES = ((0.0, (0.0, 0.0, 0.0)), (30.0, (0.08, 0.0, 0.0)), (60.0, (0.0, 0.08, 0.0)), (15.0, (0.0, 0.0, 0.08)))
CANONICAL_SINGLE = (1, 0)  # what resolve_scene("a red cube") builds: s1-p0
DEFAULT_SINGLE_VARIANTS = ((1, 0), (2, 1), (0, 2))  # (size, pose) of each colour x shape in catalogue()
# v0, v1 of "pair/A/relation/B/v*": (size ratio, yaw of A, yaw of B). The ratio is top / bottom for "on" (v0 rests
# a smaller object on a larger one) and B / A for "next-to".
PAIR_VARIANTS = ((0.75, 0.0, 0.0), (1.0, 30.0, 45.0))
PAIRS_PER_COMBO = 2  # per relation: how many partners each colour x shape gets in catalogue()
_FIT = 1.9  # compositions fill at most [-0.95, 0.95] on each axis, leaving a margin inside [-1, 1]
_GAP = 0.1  # between side-by-side objects
_MAX_PAIR_SIZE = 0.75

_ID_HELP = ("object ids look like 'single/red/cube/s1-p0' (sizes s0-s{}, poses p0-p{}) or "
            "'pair/red-cube/on/blue-sphere/v0' (relations {}, variants v0-v{})").format(
    len(SINGLE_SIZES) - 1, len(SINGLE_POSES) - 1, "/".join(RELATIONS), len(PAIR_VARIANTS) - 1)


@dataclass(frozen=True)
class Primitive:
    """A coloured unit shape (see :mod:`p2n.scenes.sdf`) scaled by ``size``, turned by ``yaw_deg`` about +Z
    and moved to ``center``."""

    shape: str
    color: str
    rgb: tuple[float, float, float]
    size: float
    center: tuple[float, float, float] = (0.0, 0.0, 0.0)
    yaw_deg: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise SceneError(f"unknown shape {self.shape!r}; known shapes: {', '.join(SHAPES)}")
        if len(self.rgb) != 3 or not all(0.0 <= v <= 1.0 for v in self.rgb):
            raise SceneError(f"rgb {self.rgb} of {self.color} {self.shape} must be three values in [0, 1]")
        if not self.size > 0:
            raise SceneError(f"size {self.size} of {self.color} {self.shape} must be positive")
        lo, hi = self.bounds()
        if min(lo) < -1 - 1e-6 or max(hi) > 1 + 1e-6:
            raise SceneError(f"{self.color} {self.shape} of size {self.size} at {self.center} spans {lo}..{hi}, "
                             f"outside the cube [-1, 1]^3 that scenes must fit in; shrink it or move its centre")

    def bounds(self) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
        """Axis-aligned bounds (lo, hi) valid at any yaw."""
        g = SHAPES[self.shape]
        r = self.size * g.radius
        x, y, z = self.center
        return (x - r, y - r, z + self.size * g.z_min), (x + r, y + r, z + self.size * g.z_max)


@dataclass(frozen=True)
class ObjectSpec:
    object_id: str
    primitives: tuple[Primitive, ...]
    captions: tuple[str, ...]  # training captions; the first is canonical ("a red cube")
    heldout_captions: tuple[str, ...]  # paraphrases from templates no training caption uses
    split: str  # "train" or "heldout"

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise SceneError(f"split {self.split!r} of {self.object_id} must be one of {SPLITS}")

    @property
    def combos(self) -> tuple[tuple[str, str], ...]:
        return tuple((p.color, p.shape) for p in self.primitives)


# ---- ids -------------------------------------------------------------------------------------------------------

def single_id(color: str, shape: str, size: int = CANONICAL_SINGLE[0], pose: int = CANONICAL_SINGLE[1]) -> str:
    return f"single/{color}/{shape}/s{size}-p{pose}"


def pair_id(a: tuple[str, str], relation: str, b: tuple[str, str], variant: int = 0) -> str:
    return f"pair/{a[0]}-{a[1]}/{relation}/{b[0]}-{b[1]}/v{variant}"


_NUM = r"(0|[1-9][0-9]*)"  # no leading zeros: one id per object
_SINGLE_RE = re.compile(rf"single/([a-z]+)/([a-z]+)/s{_NUM}-p{_NUM}")
_PAIR_RE = re.compile(rf"pair/([a-z]+)-([a-z]+)/([a-z-]+)/([a-z]+)-([a-z]+)/v{_NUM}")


def spec_from_id(object_id: str, cfg: SceneConfig | None = None) -> ObjectSpec:
    """Rebuild the spec an id names; ``cfg`` (seed, heldout_fraction) decides its split."""
    cfg = cfg or SceneConfig()

    def check(color: str, shape: str) -> tuple[str, str]:
        if color not in COLORS:
            raise SceneError(f"unknown colour {color!r} in object id {object_id!r}; known: {', '.join(COLORS)}")
        if shape not in SHAPES:
            raise SceneError(f"unknown shape {shape!r} in object id {object_id!r}; known: {', '.join(SHAPES)}")
        return color, shape

    def index(value: str, options: tuple, what: str) -> int:
        if int(value) >= len(options):
            raise SceneError(f"{what} {value} in object id {object_id!r} is out of range; {_ID_HELP}")
        return int(value)

    held = heldout_combos(cfg)
    if m := _SINGLE_RE.fullmatch(object_id):
        color, shape = check(m[1], m[2])
        yaw, offset = SINGLE_POSES[index(m[4], SINGLE_POSES, "pose")]
        prims = (Primitive(shape, color, COLORS[color].rgb, SINGLE_SIZES[index(m[3], SINGLE_SIZES, "size")],
                           offset, yaw),)
        train, heldout = single_captions(color, shape, object_id)
    elif m := _PAIR_RE.fullmatch(object_id):
        a, b, relation = check(m[1], m[2]), check(m[4], m[5]), m[3]
        if relation not in RELATIONS:
            raise SceneError(f"unknown relation {relation!r} in object id {object_id!r}; known: {', '.join(RELATIONS)}")
        variant = PAIR_VARIANTS[index(m[6], PAIR_VARIANTS, "variant")]
        prims = _stack(a, b, *variant) if relation == "on" else _side_by_side(a, b, *variant)
        train, heldout = pair_captions(a, relation, b, object_id)
    else:
        raise SceneError(f"malformed object id {object_id!r}; {_ID_HELP}")
    split = "heldout" if any(c in held for c in ((p.color, p.shape) for p in prims)) else "train"
    return ObjectSpec(object_id, prims, train, heldout, split)


# ---- layout ----------------------------------------------------------------------------------------------------

def _stack(top: tuple[str, str], bottom: tuple[str, str], ratio: float, yaw_top: float,
           yaw_bottom: float) -> tuple[Primitive, Primitive]:
    """``top`` resting on ``bottom`` along +Z, centred on the origin; top is ``ratio`` times bottom's size."""
    gt, gb = SHAPES[top[1]], SHAPES[bottom[1]]
    hb, ht = gb.z_max - gb.z_min, gt.z_max - gt.z_min
    s = min(_MAX_PAIR_SIZE, _FIT / (hb + ratio * ht), _FIT / 2 / max(gb.radius, ratio * gt.radius))
    floor = -(s * hb + ratio * s * ht) / 2
    z_bottom = floor - s * gb.z_min
    z_top = floor + s * hb - ratio * s * gt.z_min
    return (Primitive(top[1], top[0], COLORS[top[0]].rgb, ratio * s, (0.0, 0.0, z_top), yaw_top),
            Primitive(bottom[1], bottom[0], COLORS[bottom[0]].rgb, s, (0.0, 0.0, z_bottom), yaw_bottom))


def _side_by_side(a: tuple[str, str], b: tuple[str, str], ratio: float, yaw_a: float,
                  yaw_b: float) -> tuple[Primitive, Primitive]:
    """``a`` at -X and ``b`` at +X standing on a common floor; b is ``ratio`` times a's size."""
    ga, gb = SHAPES[a[1]], SHAPES[b[1]]
    ha, hb = ga.z_max - ga.z_min, gb.z_max - gb.z_min
    s = min(_MAX_PAIR_SIZE, (_FIT - _GAP) / (2 * ga.radius + 2 * ratio * gb.radius), _FIT / ha, _FIT / (ratio * hb))
    sa, sb = s, ratio * s
    half_width = (2 * ga.radius * sa + _GAP + 2 * gb.radius * sb) / 2
    floor = -max(sa * ha, sb * hb) / 2
    center_a = (-half_width + ga.radius * sa, 0.0, floor - sa * ga.z_min)
    center_b = (half_width - gb.radius * sb, 0.0, floor - sb * gb.z_min)
    return (Primitive(a[1], a[0], COLORS[a[0]].rgb, sa, center_a, yaw_a),
            Primitive(b[1], b[0], COLORS[b[0]].rgb, sb, center_b, yaw_b))


# ---- split and ordering ----------------------------------------------------------------------------------------

def heldout_combos(cfg: SceneConfig | None = None) -> frozenset[tuple[str, str]]:
    """The (colour, shape) combinations held out of training under ``cfg.seed`` and ``cfg.heldout_fraction``."""
    cfg = cfg or SceneConfig()
    return _heldout_combos(cfg.seed, cfg.heldout_fraction)


@functools.lru_cache(maxsize=32)
def _heldout_combos(seed: int, fraction: float) -> frozenset[tuple[str, str]]:
    if not 0.0 <= fraction < 1.0:
        raise SceneError(f"heldout_fraction={fraction} must be in [0, 1); e.g. 0.2 holds out a fifth of the "
                         f"colour x shape combinations")
    combos = [(c, s) for c in COLORS for s in SHAPE_WORDS]
    target = round(fraction * len(combos))
    # Greedy over a seeded order, refusing any pick that would take a colour's or shape's last training combo.
    left = {k: 0 for k in (*COLORS, *SHAPE_WORDS)}
    for c, s in combos:
        left[c] += 1
        left[s] += 1
    held: set[tuple[str, str]] = set()
    for c, s in sorted(combos, key=lambda k: stable_hash("heldout", seed, *k)):
        if len(held) == target:
            break
        if left[c] > 1 and left[s] > 1:
            held.add((c, s))
            left[c] -= 1
            left[s] -= 1
    if len(held) < target:
        raise SceneError(f"heldout_fraction={fraction} asks for {target} of {len(combos)} colour x shape "
                         f"combinations, but only {len(held)} can be held out while every colour and shape keeps "
                         f"a training example; use heldout_fraction <= {len(held) / len(combos):.2f}")
    return frozenset(held)


def _diagonal() -> list[tuple[str, str]]:
    """Every colour x shape once, ordered so any run of consecutive entries varies both colour and shape.

    Colours and shapes go in vocabulary order (the basic words first: red, orange, ...; sphere, cube, ...), so a
    small dataset is a prefix of the same objects under every seed; the seed picks the held-out combinations and
    the pairs' partners.
    """
    colors, shapes = list(COLORS), list(SHAPE_WORDS)
    nc, ns = len(colors), len(shapes)
    period = math.lcm(nc, ns)  # after each period shift the shape index, so non-coprime counts still cover all
    return [(colors[k % nc], shapes[(k + k // period) % ns]) for k in range(nc * ns)]


@functools.lru_cache(maxsize=8)
def _catalogue_ids(seed: int, include_pairs: bool) -> tuple[str, ...]:
    diag = _diagonal()
    singles = [single_id(c, s, size, pose) for size, pose in DEFAULT_SINGLE_VARIANTS for c, s in diag]
    pairs: list[str] = []
    if include_pairs:
        seen: set[tuple] = set()
        for j in range(PAIRS_PER_COMBO):
            for r in range(len(RELATIONS)):
                for k, a in enumerate(diag):
                    relation = RELATIONS[(k + r) % len(RELATIONS)]  # alternate relations along the diagonal
                    # Partners differ in colour and shape; ranked by a seeded hash, first unused one wins.
                    for b in sorted((b for b in diag if b[0] != a[0] and b[1] != a[1]),
                                    key=lambda b: stable_hash("partner", seed, relation, j, *a, *b)):
                        key = (a, b) if relation == "on" else tuple(sorted((a, b)))  # next-to is symmetric
                        if (relation, key) not in seen:
                            seen.add((relation, key))
                            pairs.append(pair_id(a, relation, b, j))
                            break
    # Merge the two streams in proportion so any prefix holds singles and pairs in the catalogue's ratio.
    out: list[str] = []
    i = p = 0
    while i < len(singles) or p < len(pairs):
        if p == len(pairs) or (i < len(singles) and i * len(pairs) <= p * len(singles)):
            out.append(singles[i])
            i += 1
        else:
            out.append(pairs[p])
            p += 1
    return tuple(out)


def catalogue(cfg: SceneConfig | None = None, num_objects: int | None = None,
              include_pairs: bool = True) -> list[ObjectSpec]:
    """The catalogue's objects, deterministic from ``cfg.seed``, both splits (see ``ObjectSpec.split``).

    The order interleaves colours, shapes, singles and pairs, so the first ``num_objects`` make a varied small
    dataset: the first 11 singles already use every colour and 7 every shape.
    """
    cfg = cfg or SceneConfig()
    ids = _catalogue_ids(cfg.seed, include_pairs)
    if num_objects is not None and not 0 <= num_objects <= len(ids):
        raise SceneError(f"num_objects={num_objects} but the catalogue has {len(ids)} objects "
                         f"({'with' if include_pairs else 'without'} pairs); ask for at most {len(ids)}")
    return [spec_from_id(i, cfg) for i in ids[:num_objects]]


def resolve_scene(text: str, cfg: SceneConfig | None = None) -> ObjectSpec:
    """An object id, or a caption such as "a crimson box" or "a blue ball on a green cube", as a spec.

    Captions give the canonical layout: size s1, pose p0 for one object, variant v0 for two.
    """
    text = text.strip()
    if text.startswith(("single/", "pair/")):
        return spec_from_id(text, cfg)
    parsed = parse_caption(text)
    if parsed.relation is None:
        return spec_from_id(single_id(*parsed.objects[0]), cfg)
    return spec_from_id(pair_id(parsed.objects[0], parsed.relation, parsed.objects[1]), cfg)
