"""Captions: disjoint training / held-out phrasing across the catalogue, and resolve_scene reading them back."""

import pytest

from p2n.scenes import COLORS, SHAPE_WORDS, catalogue, pair_id, resolve_scene, single_id
from p2n.scenes.captions import PAIR_HELDOUT, PAIR_TRAIN, SINGLE_HELDOUT, SINGLE_TRAIN, normalize


def test_template_sets_are_disjoint():
    assert not set(SINGLE_TRAIN) & set(SINGLE_HELDOUT)
    for rel in PAIR_TRAIN:
        assert not set(PAIR_TRAIN[rel]) & set(PAIR_HELDOUT[rel])


def test_heldout_phrases_never_appear_in_training():
    specs = catalogue()
    train = {normalize(c) for s in specs for c in s.captions}
    heldout = {normalize(c) for s in specs for c in s.heldout_captions}
    assert len(train) > 1000 and len(heldout) > 500
    assert not train & heldout


def test_captions_use_every_synonym_and_start_canonical():
    specs = catalogue()
    words = {w for s in specs for c in s.captions for w in normalize(c).split()}
    for color in COLORS.values():
        assert set(color.words) <= words, color.name
    for shape, synonyms in SHAPE_WORDS.items():
        assert {shape, *synonyms} <= words, shape
    cube = resolve_scene("single/orange/cube/s1-p0")
    assert cube.captions[0] == "an orange cube"
    assert resolve_scene("pair/red-cube/on/blue-sphere/v0").captions[0] == "a red cube on a blue sphere"


def test_every_caption_resolves_to_its_object():
    for spec in catalogue()[::3]:
        parts = spec.object_id.split("/")
        if parts[0] == "single":
            expected = single_id(parts[1], parts[2])
        else:
            expected = pair_id(tuple(parts[1].split("-")), parts[2], tuple(parts[3].split("-")))
        for caption in spec.captions + spec.heldout_captions:
            assert resolve_scene(caption).object_id == expected, caption


@pytest.mark.parametrize("text, expected", [
    ("a red cube", "single/red/cube/s1-p0"),
    ("A CRIMSON box!", "single/red/cube/s1-p0"),
    ("red cube", "single/red/cube/s1-p0"),
    ("  an Aqua doughnut. ", "single/cyan/torus/s1-p0"),
    ("a blue ball on a green cube", "pair/blue-sphere/on/green-cube/v0"),
    ("a green cube under a blue ball", "pair/blue-sphere/on/green-cube/v0"),
    ("a green cube with a blue orb on top", "pair/blue-sphere/on/green-cube/v0"),
    ("a red pill beside a grey pyramid", "pair/red-capsule/next-to/gray-pyramid/v0"),
    ("pair/red-cube/next-to/blue-sphere/v1", "pair/red-cube/next-to/blue-sphere/v1"),
    ("single/red/cube/s2-p3", "single/red/cube/s2-p3"),
])
def test_resolve_scene(text, expected):
    spec = resolve_scene(text)
    assert spec.object_id == expected
    assert spec.split in ("train", "heldout")


def test_resolve_canonical_single_is_centred():
    (p,) = resolve_scene("a red cube").primitives
    assert (p.center, p.yaw_deg, p.size) == ((0.0, 0.0, 0.0), 0.0, 0.75)


@pytest.mark.parametrize("text, message", [
    ("a shiny red cube", r"unknown word\(s\) \['shiny'\].*Known colours: red, orange.*known shapes: sphere, cube"),
    ("", "it is empty"),
    ("a red", "'red' has no matching shape"),
    ("red blue cube", "two colours"),
    ("a red cube on", "only one object"),
    ("red cube blue sphere", "say how the two objects relate"),
    ("a red cube on a blue sphere on a green cone", "3 objects"),
])
def test_resolve_scene_errors_name_the_problem(text, message):
    with pytest.raises(ValueError, match=message):
        resolve_scene(text)
