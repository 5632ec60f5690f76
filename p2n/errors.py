"""The one base class of every error p2n raises on purpose (a bad value from a user, a missing file).

Does not own: the concrete error classes; each package keeps its own next to the code that raises them.
"""


class P2NError(ValueError):
    """Base of p2n's own errors; a ValueError so callers that catch bad input keep working."""


class SceneError(P2NError):
    """A scene description (caption, procedural id, primitive) that p2n cannot build."""
