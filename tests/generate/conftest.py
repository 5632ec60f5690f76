"""Fixtures for the ``p2n generate`` / ``interpolate`` / ``eval`` CLI tests: two generator checkpoints, built once
per session.

``tiny_gen_ckpt`` is the Serve tests' tiny generator (``tests/serve/tiny_generator.py``: seeded random weights
around a NeRF fitted to "a green sphere", its own small field). ``trained_gen_ckpt`` is a generator actually
trained on the shared tiny dataset (``tiny_vae_dir`` from ``tests/conftest.py`` plus a short aligner run with the
offline ``tiny-clip`` encoders), so it has the dataset's field layout, ``p2n eval`` accepts it, and different
prompts decode to visibly different objects.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from p2n.train.testing import tiny_config


def tiny_generator_module() -> ModuleType:
    """``tests/serve/tiny_generator.py`` as the module ``tiny_generator`` (the name the Serve conftest imports it
    by, so a full run shares one copy); tests/serve is not on sys.path when only this folder is collected."""
    name = "tiny_generator"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "serve" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


# Aligner settings for the trained checkpoint: the offline tiny-clip encoders for text and images, a small
# transformer, and just enough steps (~10 s) that each training caption decodes to its own object. No embedding
# noise: it buys paraphrase robustness from a semantic encoder over many steps; tiny-clip's weights are random.
TRAINED_ALIGN = ["train.backend=ddp", "align.steps=150", "align.text_noise=0", "align.text_encoder=tiny-clip",
                 "align.image_encoder=tiny-clip", "align.model_dim=32", "align.depth=1", "align.heads=2",
                 "train.eval_objects=2", "train.eval_views=1"]


@pytest.fixture(scope="session")
def tiny_generator() -> ModuleType:
    """The module, for its config lists (``FIELD``, ``SCENE``)."""
    return tiny_generator_module()


@pytest.fixture(scope="session")
def tiny_gen_ckpt(tmp_path_factory: pytest.TempPathFactory, tiny_generator) -> Path:
    return tiny_generator.build_tiny_generator(tmp_path_factory.mktemp("tiny-generator"))


@pytest.fixture(scope="session")
def trained_gen_ckpt(tmp_path_factory, tiny_dataset, tiny_vae_dir) -> Path:
    from p2n.data import open_dataset
    from p2n.latent import load_vae
    from p2n.train import AlignStage, records_from_rows, run

    records, _ = records_from_rows(open_dataset(str(tiny_dataset)).rows())
    stage = AlignStage(tiny_config(TRAINED_ALIGN), [r for r in records if r.split == "train"],
                       [r for r in records if r.split != "train"], load_vae(str(tiny_vae_dir)),
                       vae_uri=str(tiny_vae_dir))
    run(stage)
    out = tmp_path_factory.mktemp("trained-generator")
    stage.export(str(out))
    return out
