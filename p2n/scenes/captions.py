"""Caption templates for catalogue objects, and the parser that reads a caption back into colours, shapes and
a relation.

Design: captions come from two *disjoint* template sets. Training templates ("a red cube", "a cube that is
red", "a red cube on top of a blue sphere") fill each object's ``captions``; held-out templates ("one cube,
painted red", "a blue sphere with a red cube on top") fill ``heldout_captions``, which no training caption of any
object ever equals (tests check this across the whole catalogue, after :func:`normalize`). Both sets draw on the
same synonym vocabulary; which synonym a caption uses is a stable hash of the object id and the caption's slot,
so captions are reproducible from the id alone and every synonym turns up somewhere in training.

Does not own: the vocabulary (:mod:`p2n.scenes.vocab`) or object specs (:mod:`p2n.scenes.catalogue`).
"""

from __future__ import annotations

from p2n.errors import SceneError

import hashlib
import re
from dataclasses import dataclass

from p2n.scenes.vocab import COLORS, SHAPE_WORDS, color_by_word, shape_by_word, shape_words

# Single objects. Fields: c (colour word), s (shape word), a_c / a_s (the article "a"/"an" before c / s).
SINGLE_TRAIN = ("{a_c} {c} {s}", "{a_s} {s} that is {c}", "a 3d model of {a_c} {c} {s}", "a simple {c} {s}")
SINGLE_HELDOUT = ("one {s}, painted {c}", "{a_c} {c}-coloured {s} sitting alone", "a lone {s} in {c}")
# Pairs. A and B are noun phrases with their article ("a red cube"); A is the first object of the id.
PAIR_TRAIN = {
    "on": ("{A} on {B}", "{A} on top of {B}", "{A} resting on {B}"),
    "next-to": ("{A} next to {B}", "{A} beside {B}", "{A} and {B} side by side"),
}
PAIR_HELDOUT = {
    "on": ("{B} with {A} on top", "{A} stacked above {B}"),
    "next-to": ("{A} alongside {B}", "{A} placed near {B}"),
}

# Words the parser understands besides colours and shapes. Relation words decide how two objects relate;
# filler words (everything the templates use, plus a few obvious ones) carry no meaning.
_ON = {"on", "top", "upon", "atop", "above", "over"}
_UNDER = {"under", "below", "beneath", "underneath"}
_NEXT = {"next", "beside", "alongside", "near", "by", "side", "and", "besides"}
_FILLER = {"a", "an", "the", "one", "that", "is", "of", "to", "it", "3d", "model", "simple", "painted", "coloured",
           "colored", "sitting", "alone", "lone", "in", "resting", "stacked", "placed", "standing", "object",
           "shape", "single", "each", "other", "another", "its"}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def normalize(text: str) -> str:
    """Lower-case words without punctuation or articles: the form in which two captions count as the same."""
    return " ".join(w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in ("a", "an", "the"))


def stable_hash(*parts: object) -> int:
    # Python's hash() is salted per process; captions, the catalogue's order and camera seeds must not change
    # between runs.
    return int.from_bytes(hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest(), "big")


def _word(words: tuple[str, ...], key: str, slot: int) -> str:
    return words[(stable_hash(key) + slot) % len(words)]


def _words(color: str, shape: str, key: str, slot: int) -> tuple[str, str]:
    """The colour and shape words caption ``slot`` of object ``key`` uses."""
    return _word(COLORS[color].words, key + "/c", slot), _word(shape_words(shape), key + "/s", slot)


def _noun_phrase(color: str, shape: str) -> str:
    return f"{article(color)} {color} {shape}"


Captions = tuple[tuple[str, ...], tuple[str, ...]]  # (training captions, held-out captions)


def single_captions(color: str, shape: str, key: str) -> Captions:
    """Captions of one object; ``key`` (the object id) picks the synonyms. The first is canonical ("a red cube")."""
    def fill(template: str, slot: int, canonical: bool = False) -> str:
        c, s = (color, shape) if canonical else _words(color, shape, key, slot)
        return template.format(c=c, s=s, a_c=article(c), a_s=article(s))

    return (tuple(fill(t, i, canonical=(i == 0)) for i, t in enumerate(SINGLE_TRAIN)),
            tuple(fill(t, 100 + i) for i, t in enumerate(SINGLE_HELDOUT)))


def pair_captions(a: tuple[str, str], relation: str, b: tuple[str, str], key: str) -> Captions:
    """Captions of ``a`` (colour, shape) ``relation`` ``b``; the first is canonical ("a red cube on a blue sphere")."""
    def fill(template: str, slot: int, canonical: bool = False) -> str:
        if canonical:
            return template.format(A=_noun_phrase(*a), B=_noun_phrase(*b))
        return template.format(A=_noun_phrase(*_words(*a, key + "/A", slot)),
                               B=_noun_phrase(*_words(*b, key + "/B", slot)))

    return (tuple(fill(t, i, canonical=(i == 0)) for i, t in enumerate(PAIR_TRAIN[relation])),
            tuple(fill(t, 100 + i) for i, t in enumerate(PAIR_HELDOUT[relation])))


@dataclass(frozen=True)
class ParsedCaption:
    """What a caption says: one (colour, shape), or two and how the first relates to the second."""

    objects: tuple[tuple[str, str], ...]
    relation: str | None = None  # None for one object


def parse_caption(text: str) -> ParsedCaption:
    """Read "a crimson box", "one cube, painted red", "a blue ball with a red cube on top", ... back.

    Case, punctuation and articles are ignored; every other word must be a colour, a shape or a known relation
    or filler word, so a typo is an error rather than a silently different object.
    """
    colors, shapes = color_by_word(), shape_by_word()
    words = re.findall(r"[a-z0-9]+", text.lower())
    unknown = [w for w in words if w not in colors and w not in shapes and w not in _ON | _UNDER | _NEXT | _FILLER
               and w != "with"]
    if unknown or not words:
        raise SceneError(
            f"cannot read {text!r}: " + (f"unknown word(s) {unknown}" if unknown else "it is empty") + ". "
            f"Describe one or two objects, e.g. 'a red cube' or 'a red cube on a blue sphere'. "
            f"Known colours: {', '.join(COLORS)}; known shapes: {', '.join(SHAPE_WORDS)}; synonyms: "
            + "; ".join(f"{k}: {'/'.join(v)}" for k, v in
                        [*((c.name, c.synonyms) for c in COLORS.values()), *SHAPE_WORDS.items()] if v)
            + ". Relations: 'on' (also 'on top of', 'above', 'under', 'with ... on top') and 'next to' ('beside').")

    # Pair each colour with the shape adjacent to it in the word stream ("red cube" or "cube ... red").
    objects: list[tuple[str, str]] = []
    color = shape = None
    for w in words:
        if w in colors:
            if color is not None:
                raise SceneError(f"cannot read {text!r}: two colours ({color}, {colors[w]}) for one object; "
                                 f"name one colour per shape")
            color = colors[w]
        elif w in shapes:
            if shape is not None:
                raise SceneError(f"cannot read {text!r}: two shapes ({shape}, {shapes[w]}) without a colour "
                                 f"between them; give each shape a colour, e.g. 'a red cube on a blue sphere'")
            shape = shapes[w]
        if color is not None and shape is not None:
            objects.append((color, shape))
            color = shape = None
    if color is not None or shape is not None:
        raise SceneError(f"cannot read {text!r}: {color or shape!r} has no matching "
                         f"{'shape' if color else 'colour'}; every object needs a colour and a shape")
    if len(objects) > 2:
        raise SceneError(f"cannot read {text!r}: {len(objects)} objects; the catalogue has one or two per scene")

    ws = set(words)
    if len(objects) == 1:
        if ws & (_ON | _UNDER | _NEXT | {"with"}):
            raise SceneError(f"cannot read {text!r}: it names a relation but only one object; "
                             f"add the second object, e.g. 'a red cube on a blue sphere'")
        return ParsedCaption(tuple(objects))
    if ws & (_ON | _UNDER):
        # "A on B" puts A on top; "B with A on top" and "A under B" reverse the roles.
        reverse = ("with" in ws) != bool(ws & _UNDER)
        return ParsedCaption((objects[1], objects[0]) if reverse else tuple(objects), "on")
    if ws & _NEXT or "with" in ws:
        return ParsedCaption(tuple(objects), "next-to")
    raise SceneError(f"cannot read {text!r}: say how the two objects relate, e.g. 'on', 'on top of' or 'next to'")
