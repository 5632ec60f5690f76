"""Errors of the prompt/image encoders: bad prompts, bad images, unknown specs, weights that are not on disk.

Every message names the bad value and says how to fix it. Does not own: P2NError itself (`p2n/errors.py`).
"""

from __future__ import annotations

from p2n.errors import P2NError


class PromptError(P2NError):
    """A text prompt that no encoder should see: not a str, empty, or with control characters."""


class PromptTooLong(PromptError):
    """A prompt with more tokens than the encoder's context; encoders would silently truncate it."""


class ImageError(P2NError):
    """An image batch with the wrong shape, channels, dtype, range or size, or non-finite values."""


class EncoderError(P2NError):
    """A problem with the encoder itself rather than with its input."""


class UnknownEncoder(EncoderError):
    """An encoder spec that names no registered encoder, or a malformed argument of a known one."""


class EncoderWeightsMissing(EncoderError):
    """The weights an encoder needs are not on this machine, and p2n never downloads them."""


class ImagesNotSupported(EncoderError):
    """`encode_image` called on a text-only encoder."""
