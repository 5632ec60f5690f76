"""Catalogue: determinism, id round trip, coverage, layout and the held-out split."""

import pytest

from p2n.config import SceneConfig
from p2n.scenes import COLORS, SHAPE_WORDS, catalogue, heldout_combos, spec_from_id
from p2n.scenes.catalogue import DEFAULT_SINGLE_VARIANTS, PAIRS_PER_COMBO
from p2n.scenes.vocab import RELATIONS


def test_catalogue_is_deterministic_and_seeded():
    cfg = SceneConfig(seed=3)
    a, b = catalogue(cfg), catalogue(SceneConfig(seed=3))
    assert a == b
    assert [s.object_id for s in catalogue(SceneConfig(seed=4))] != [s.object_id for s in a]


def test_default_size_and_unique_ids():
    specs = catalogue()
    combos = len(COLORS) * len(SHAPE_WORDS)
    assert len(specs) == combos * len(DEFAULT_SINGLE_VARIANTS) + combos * PAIRS_PER_COMBO * len(RELATIONS) == 539
    assert len({s.object_id for s in specs}) == len(specs)
    assert len(catalogue(include_pairs=False)) == combos * len(DEFAULT_SINGLE_VARIANTS)


def test_ids_round_trip():
    cfg = SceneConfig(seed=1, heldout_fraction=0.3)
    for spec in catalogue(cfg):
        assert spec_from_id(spec.object_id, cfg) == spec


def test_coverage_and_interleaving():
    specs = catalogue()
    shapes = {p.shape for s in specs for p in s.primitives}
    colors = {p.color for s in specs for p in s.primitives}
    assert len(shapes) >= 6 and len(colors) >= 8
    assert {s.object_id.split("/")[2] for s in specs if s.object_id.startswith("pair/")} == set(RELATIONS)
    singles = [s for s in catalogue(num_objects=40, include_pairs=False)]
    assert {s.primitives[0].color for s in singles[: len(COLORS)]} == set(COLORS)
    assert {s.primitives[0].shape for s in singles[: len(SHAPE_WORDS)]} == set(SHAPE_WORDS)
    first = catalogue(num_objects=8)
    assert 2 <= sum(len(s.primitives) == 2 for s in first) <= 6  # small demos see singles and pairs
    assert len({p.color for s in first for p in s.primitives}) >= 6


def test_everything_fits_in_the_unit_cube():
    for spec in catalogue():
        for p in spec.primitives:
            lo, hi = p.bounds()
            assert min(lo) >= -1 - 1e-9 and max(hi) <= 1 + 1e-9, spec.object_id


def test_pair_layouts():
    top, bottom = spec_from_id("pair/red-cube/on/blue-sphere/v0").primitives
    assert (top.color, top.shape, bottom.color, bottom.shape) == ("red", "cube", "blue", "sphere")
    assert top.bounds()[0][2] == pytest.approx(bottom.bounds()[1][2])  # resting: the faces touch
    assert top.size == pytest.approx(0.75 * bottom.size)
    a, b = spec_from_id("pair/green-cone/next-to/yellow-torus/v1").primitives
    assert a.bounds()[1][0] < b.bounds()[0][0]  # side by side, apart along x
    assert a.bounds()[0][2] == pytest.approx(b.bounds()[0][2])  # on a common floor
    assert (a.yaw_deg, b.yaw_deg) == (30.0, 45.0)


def test_single_variants():
    s = spec_from_id("single/red/cube/s2-p1").primitives[0]
    assert (s.size, s.yaw_deg, s.center) == (0.9, 30.0, (0.08, 0.0, 0.0))
    assert s.rgb == COLORS["red"].rgb


@pytest.mark.parametrize("bad, message", [
    ("single/red/cube", "malformed object id"),
    ("single/mauve/cube/s1-p0", "unknown colour 'mauve'"),
    ("single/red/hexagon/s1-p0", "unknown shape 'hexagon'"),
    ("single/red/cube/s7-p0", "size 7"),
    ("single/red/cube/s01-p0", "malformed object id"),
    ("pair/red-cube/under/blue-sphere/v0", "unknown relation 'under'"),
    ("pair/red-cube/on/blue-sphere/v9", "variant 9"),
])
def test_bad_ids_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        spec_from_id(bad)


def test_heldout_combos_never_reach_training():
    cfg = SceneConfig(seed=0, heldout_fraction=0.2)
    held = heldout_combos(cfg)
    combos = len(COLORS) * len(SHAPE_WORDS)
    assert len(held) == round(0.2 * combos) == 15
    specs = catalogue(cfg)
    train_combos = {c for s in specs if s.split == "train" for c in s.combos}
    assert not train_combos & held
    assert {c for c, _ in train_combos} == set(COLORS) and {s for _, s in train_combos} == set(SHAPE_WORDS)
    for s in specs:
        assert (s.split == "heldout") == bool(set(s.combos) & held), s.object_id
    assert {s.split for s in specs if len(s.primitives) == 1} == {"train", "heldout"}
    assert heldout_combos(SceneConfig(seed=1)) != held


def test_heldout_fraction_limits():
    assert heldout_combos(SceneConfig(heldout_fraction=0.0)) == frozenset()
    assert all(s.split == "train" for s in catalogue(SceneConfig(heldout_fraction=0.0)))
    with pytest.raises(ValueError, match="heldout_fraction=0.95"):
        heldout_combos(SceneConfig(heldout_fraction=0.95))
    with pytest.raises(ValueError, match=r"must be in \[0, 1\)"):
        heldout_combos(SceneConfig(heldout_fraction=1.0))


def test_num_objects_beyond_the_catalogue_is_an_error():
    assert len(catalogue(num_objects=5)) == 5
    with pytest.raises(ValueError, match="num_objects=100000"):
        catalogue(num_objects=100000)
