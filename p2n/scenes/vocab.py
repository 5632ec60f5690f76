"""The words of the procedural catalogue: named colours (with RGB values), shape names and spatial relations,
each with the synonyms that captions may use.

Owns the vocabulary only. Caption templates and parsing live in :mod:`p2n.scenes.captions`, shape geometry in
:mod:`p2n.scenes.sdf`. Synonyms are single words that name the *same* colour or shape ("crimson" for red, not
"navy" for blue), so a caption never describes a different object than its spec.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Color:
    name: str
    rgb: tuple[float, float, float]  # linear albedo in [0, 1], before shading
    synonyms: tuple[str, ...] = ()

    @property
    def words(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)


# Chosen to stay far apart in RGB (every pair differs by > 0.3) so a fitted NeRF's colours remain nameable.
COLORS: dict[str, Color] = {c.name: c for c in (
    Color("red", (0.85, 0.12, 0.10), ("crimson", "scarlet")),
    Color("orange", (0.95, 0.50, 0.08), ("tangerine",)),
    Color("yellow", (0.95, 0.85, 0.15), ("lemon", "gold")),
    Color("green", (0.15, 0.65, 0.20), ("emerald", "jade")),
    Color("blue", (0.12, 0.25, 0.85), ("cobalt", "sapphire")),
    Color("purple", (0.55, 0.20, 0.75), ("violet", "amethyst")),
    Color("pink", (0.95, 0.55, 0.75), ("rose",)),
    Color("cyan", (0.10, 0.80, 0.85), ("turquoise", "aqua")),
    Color("white", (0.92, 0.92, 0.92), ("ivory",)),
    Color("gray", (0.50, 0.50, 0.50), ("grey", "slate")),
    Color("brown", (0.50, 0.30, 0.12), ("chocolate", "chestnut")),
)}

# Shape name -> synonyms. Geometry for each name is in p2n.scenes.sdf.SHAPES (a test keeps the keys equal).
SHAPE_WORDS: dict[str, tuple[str, ...]] = {
    "sphere": ("ball", "orb"),
    "cube": ("box", "block"),
    "cylinder": ("can", "drum"),
    "cone": (),
    "torus": ("ring", "donut", "doughnut"),
    "capsule": ("pill",),
    "pyramid": (),
}

# Two-object relations, as they appear in object ids. "on": the first object rests on top of the second
# (stacked along +Z); "next-to": the two stand side by side on a common floor.
RELATIONS: tuple[str, ...] = ("on", "next-to")


def shape_words(shape: str) -> tuple[str, ...]:
    return (shape, *SHAPE_WORDS[shape])


def color_by_word() -> dict[str, str]:
    """Every colour word (name or synonym) -> canonical colour name."""
    return {w: c.name for c in COLORS.values() for w in c.words}


def shape_by_word() -> dict[str, str]:
    """Every shape word (name or synonym) -> canonical shape name."""
    return {w: s for s in SHAPE_WORDS for w in shape_words(s)}
