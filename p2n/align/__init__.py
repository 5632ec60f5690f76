"""Stage 2: prompt encoders (`build_encoder`) and, alongside, the aligner that maps embeddings to VAE latents."""

from p2n.align.aligner import Aligner, AlignerBundle, build_encoders, load_aligner, save_aligner
from p2n.align.encoders import PromptEncoder, available_encoders, build_encoder, register_encoder
from p2n.align.errors import (
    EncoderError,
    EncoderWeightsMissing,
    ImageError,
    ImagesNotSupported,
    PromptError,
    PromptTooLong,
    UnknownEncoder,
)

__all__ = [
    "Aligner",
    "AlignerBundle",
    "EncoderError",
    "EncoderWeightsMissing",
    "ImageError",
    "ImagesNotSupported",
    "PromptEncoder",
    "PromptError",
    "PromptTooLong",
    "UnknownEncoder",
    "available_encoders",
    "build_encoder",
    "build_encoders",
    "load_aligner",
    "register_encoder",
    "save_aligner",
]
