"""Fixtures of the gateway service tests: a model directory the gateway can serve (tokenizer,
GLM-4.5 template, generation_config.json with sampling defaults; no weights) and its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gateway.tokenizer import Tokenizer
from tests.service.gateway_harness import GEN_TEMPERATURE, GEN_TOP_P


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common.tools.tiny_tokenizer import write_tokenizer_files

    d = tmp_path_factory.mktemp("gateway_model")
    write_tokenizer_files(d, "glm45")
    gen = json.loads((d / "generation_config.json").read_text())
    gen.update(temperature=GEN_TEMPERATURE, top_p=GEN_TOP_P)
    (d / "generation_config.json").write_text(json.dumps(gen))
    return d


@pytest.fixture(scope="session")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(model_dir)
