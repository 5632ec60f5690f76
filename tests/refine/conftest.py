"""Tiny random diffusion models for the guidance tests, built once per session into a temp folder, and one
intra-op thread while these tests run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from p2n.refine.guidance.tiny import build_tiny_sd, build_tiny_zero123


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The tiny models' ops take microseconds: with several intra-op threads the time goes to thread
    # hand-offs, and on a busy 2-core machine spinning workers made this file 10x slower (8 s vs 120 s).
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"), seed=0)


@pytest.fixture(scope="session")
def tiny_zero123_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_zero123(tmp_path_factory.mktemp("tiny-zero123"), seed=0)
