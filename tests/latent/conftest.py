"""A tiny fitted dataset and a VAE trained on it, shared by every test in the session (built once, on disk under
pytest's session temp dir; tests/train reuses the same files)."""

from pathlib import Path

import pytest

from p2n.train.testing import build_tiny_dataset, tiny_config, train_tiny_vae


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_cfg) -> Path:
    return build_tiny_dataset(tmp_path_factory.getbasetemp() / "p2n-tiny-dataset", 10, tiny_cfg)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory, tiny_dataset, tiny_cfg) -> Path:
    return train_tiny_vae(tiny_dataset, tmp_path_factory.getbasetemp() / "p2n-tiny-vae", tiny_cfg)
