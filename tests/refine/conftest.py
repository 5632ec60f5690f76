"""Tiny random diffusion models for the guidance tests, built once per session into a temp folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2n.refine.guidance.tiny import build_tiny_sd, build_tiny_zero123


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"), seed=0)


@pytest.fixture(scope="session")
def tiny_zero123_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_zero123(tmp_path_factory.mktemp("tiny-zero123"), seed=0)
