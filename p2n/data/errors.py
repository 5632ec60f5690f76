"""Errors of the dataset package."""

from p2n.errors import P2NError


class DataError(P2NError):
    """A dataset location, catalogue or row that cannot be used; the message says which and what to do."""
