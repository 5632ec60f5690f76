"""Fixtures for the Serve tests: the tiny generator checkpoint (``tiny_generator.py``), built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tiny_generator import build_tiny_generator


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_generator(tmp_path_factory.mktemp("generator"))
