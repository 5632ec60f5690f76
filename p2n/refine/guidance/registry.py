"""The name -> constructor table of refinement guidances (threestudio-style registry).

Owns: :data:`GUIDANCES`, :func:`register_guidance`, :func:`build_guidance`. Implementations register themselves
when their module is imported; ``p2n.refine.guidance`` imports the built-in ones (sds, zero123, clip) and other
modules (the refinement loop's "multiview") add theirs with the same decorator.
Does not own: any guidance implementation.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from p2n.refine.guidance.base import Guidance, GuidanceConfig, UnknownGuidance

GuidanceConstructor = Callable[[GuidanceConfig], Guidance]
GUIDANCES: dict[str, GuidanceConstructor] = {}

C = TypeVar("C", bound=GuidanceConstructor)


def register_guidance(name: str) -> Callable[[C], C]:
    """Class/function decorator: ``@register_guidance("sds")`` makes ``build_guidance("sds", cfg)`` build it."""

    def deco(ctor: C) -> C:
        existing = GUIDANCES.get(name)
        if existing is not None and existing is not ctor:
            # Two plugins under one name would make the config ambiguous; the later one must pick another name.
            raise ValueError(f"guidance {name!r} is already registered to {existing!r}")
        GUIDANCES[name] = ctor
        if isinstance(ctor, type) and issubclass(ctor, Guidance) and not ctor.name:
            ctor.name = name
        return ctor

    return deco


def build_guidance(name: str, cfg: GuidanceConfig | None = None) -> Guidance:
    """The guidance registered as ``name``, built from ``cfg`` (defaults when None)."""
    ctor = GUIDANCES.get(name)
    if ctor is None:
        raise UnknownGuidance(f"unknown guidance {name!r}; choose one of: {', '.join(sorted(GUIDANCES))}")
    return ctor(cfg if cfg is not None else GuidanceConfig())
