"""Suite-wide settings: one torch thread per process (Ray workers and subprocesses share 2 cores with pytest,
and many small ops on 2 threads mostly wait on each other), seeded RNGs, and no network beyond 127.0.0.1.

Also the tiny fitted dataset and VAE that the training, latent and job-submission tests share: built once per
session under pytest's session temp dir (``p2n.train.testing``). ``tests/data`` has its own, smaller ``tiny_cfg``.
"""

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
torch.set_num_threads(1)

from p2n.train.testing import build_tiny_dataset, tiny_config, train_tiny_vae  # noqa: E402


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_config()


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory, tiny_cfg) -> Path:
    # The catalogue's first 11 singles: 9 training objects and 2 held-out colour x shape combinations
    # (cyan sphere, brown cone), so evaluation has both splits.
    return build_tiny_dataset(tmp_path_factory.getbasetemp() / "p2n-tiny-dataset", 11, tiny_cfg)


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory, tiny_dataset, tiny_cfg) -> Path:
    return train_tiny_vae(tiny_dataset, tmp_path_factory.getbasetemp() / "p2n-tiny-vae", tiny_cfg)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
