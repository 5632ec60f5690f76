"""Where a refinement starts: the three initializations the paper compares.

- ``generated``  the Generator's one-forward-pass NeRF for the target's prompt (or, without one, its reference image)
- ``mean``       the Generator's mean latent decoded: the best guess that knows nothing about the prompt
- ``scratch``    the shared initialization ``p2n.nerf.field.init_params(cfg.field, cfg.fit.init_seed)``, the start
                 of every fit in the dataset

A generator is anything with ``params_from_prompts(list[str]) -> [B, P]``, ``params_from_images([B, H, W, 3])
-> [B, P]``, ``mean_params() -> [P]`` and ``cfg`` (a P2NConfig whose ``field`` gives the layout), i.e.
``p2n.generate.Generator``; :func:`load_generator` loads that one from a checkpoint.

Does not own: the generator (``p2n.generate``) or the loop (``loop.py``).
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from p2n.config import P2NConfig
from p2n.errors import P2NError
from p2n.nerf.field import NeRFField, init_params
from p2n.nerf.params import check_finite
from p2n.refine.target import RefineTarget

INITS = ("generated", "mean", "scratch")


class InitError(P2NError):
    """An initialization that cannot be built: unknown name, no generator, a layout that does not match."""


class GeneratorLike(Protocol):
    cfg: Any

    def params_from_prompts(self, prompts: list[str]) -> Tensor: ...

    def params_from_images(self, images: Tensor) -> Tensor: ...

    def mean_params(self) -> Tensor: ...


def check_init_name(init: str) -> None:
    if init not in INITS:
        raise InitError(f"unknown init {init!r}; choose one of: {', '.join(INITS)}")


def load_generator(uri: str, cfg: P2NConfig | None = None) -> GeneratorLike:
    """``p2n.generate.Generator.load(uri, cfg)``, with the errors a CLI user can act on. The generator's ``cfg`` is
    ``cfg`` with the field layout of its VAE."""
    import os

    if "://" not in str(uri) and not os.path.exists(os.path.expanduser(str(uri))):
        raise InitError(f"--ckpt {uri}: no such file or folder; pass a trained generator checkpoint (the folder "
                        "`p2n train` or `p2n demo` writes, e.g. outputs/demo/train/align), or use --init scratch")
    try:
        from p2n.generate import Generator
    except ModuleNotFoundError as e:
        if e.name == "p2n.generate":
            raise InitError("this p2n has no generator (p2n/generate.py); use --init scratch") from None
        raise
    try:
        return Generator.load(str(uri), cfg)
    except P2NError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise InitError(f"--ckpt {uri}: cannot load a generator from it ({e})") from None


def check_generator_layout(generator: GeneratorLike, cfg: P2NConfig) -> None:
    gen_field = generator.cfg.field
    if gen_field.layout_hash() != cfg.field.layout_hash():
        raise InitError(f"the generator makes NeRFs for another field layout ({gen_field}) than the configured one "
                        f"({cfg.field}); refine with the generator's field config (p2n refine does this when "
                        "given --ckpt)")


def initial_params(init: str, cfg: P2NConfig, target: RefineTarget | None = None,
                   generator: GeneratorLike | None = None) -> Tensor:
    """The starting parameter vector [P] (float32, CPU) for ``init`` (one of :data:`INITS`)."""
    check_init_name(init)
    if init == "scratch":
        return init_params(cfg.field, cfg.fit.init_seed)
    if generator is None:
        raise InitError(f"--init {init} needs a trained generator: pass --ckpt URI (e.g. outputs/demo/train/align), "
                        "or use --init scratch")
    check_generator_layout(generator, cfg)
    with torch.no_grad():
        if init == "mean":
            p = generator.mean_params()
        elif target is not None and target.prompt:
            p = generator.params_from_prompts([target.prompt])[0]
        elif target is not None and target.ref_image is not None:
            p = generator.params_from_images(target.ref_image[None].float())[0]
        else:
            raise InitError("--init generated needs a prompt or a reference image to generate from "
                            "(--prompt, --image, --scene, or a --data folder with captions)")
    p = p.detach().float().cpu().reshape(-1)
    n = NeRFField(cfg.field).num_params
    if p.numel() != n:
        raise InitError(f"the generator returned {p.numel()} parameters, the field needs {n}")
    try:
        check_finite(p, f"{init} parameters")
    except P2NError as e:
        raise InitError(str(e)) from None
    return p
