"""Worker flags: a worker accepts the flags of a shared SGLang launch line (the gateway's too) and
uses only its own; the thinking budget stays the gateway's."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.serving.launch_flags import accept_foreign_flags, foreign_flags_given
from common.worker.args import add_worker_args, build_worker_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_worker_args(p, default_port=31000)
    accept_foreign_flags(p, "decode")
    return p


def test_gateway_flags_are_accepted_and_not_used(tmp_path: Path) -> None:
    ns = _parser().parse_args(["--model-path", str(tmp_path), "--device", "cpu", "--default-thinking-budget", "64",
                               "--tool-call-parser", "glm45", "--served-model-name", "glm", "--enable-metrics"])
    cfg, _ = build_worker_config("decode", ns)
    assert not hasattr(cfg, "default_thinking_budget")  # the worker has no budget of its own
    assert foreign_flags_given(ns) == ["--default-thinking-budget", "--enable-metrics", "--served-model-name",
                                       "--tool-call-parser"]
    assert "used by gateway" in _parser().format_help()
