"""Shared fixtures: the tiny random GLM-4 MoE checkpoint (with MTP layer and tokenizer), built once."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-layer GLM-4.5-style tiny model directory (common.tools.tiny_model defaults)."""
    from common.tools.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_glm45"), template="glm45")
