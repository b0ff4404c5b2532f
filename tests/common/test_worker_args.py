"""Worker flags: the thinking budget is the gateway's, and a worker that is given it says so."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from common.worker.args import add_worker_args, build_worker_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_worker_args(p, default_port=31000)
    return p


def test_default_thinking_budget_is_refused_with_where_it_went(tmp_path: Path) -> None:
    ns = _parser().parse_args(["--model-path", str(tmp_path), "--device", "cpu", "--default-thinking-budget", "64"])
    with pytest.raises(ValueError, match=r"^--default-thinking-budget is a gateway flag \(python -m gateway"):
        build_worker_config("decode", ns)
    assert "--default-thinking-budget" not in _parser().format_help()
    cfg, _ = build_worker_config("decode", _parser().parse_args(["--model-path", str(tmp_path), "--device", "cpu"]))
    assert not hasattr(cfg, "default_thinking_budget")  # the worker has no budget of its own
