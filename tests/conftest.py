"""Session-wide fixtures: the standard tiny checkpoints (tests/tiny_models.py), each built once per session.

Each fixture is the checkpoint folder's Path. Treat it as read-only; copy it (tiny_models.copy_checkpoint)
before damaging it.
"""
from __future__ import annotations

from pathlib import Path

import pytest


def _build(tmp_path_factory: pytest.TempPathFactory, name: str) -> Path:
    from tiny_models import STANDARD_SPECS, build_tiny_checkpoint  # imports torch/transformers: only when used

    return build_tiny_checkpoint(tmp_path_factory.mktemp(name), STANDARD_SPECS[name])


@pytest.fixture(scope="session")
def tiny_qlora_yarn(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny_qlora_yarn")


@pytest.fixture(scope="session")
def tiny_direct_q_plain_rope(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny_direct_q_plain_rope")


@pytest.fixture(scope="session")
def tiny_fp8_sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny_fp8_sharded")


@pytest.fixture(scope="session")
def tiny_bf16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory, "tiny_bf16")
