"""Worker flags: the thinking budget is the gateway's, and a worker that is given it says so; the tensor-parallel
flags, and the refusal of what cannot run, by flag."""

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


@pytest.mark.parametrize(("flags", "message"), [
    (["--tp-size", "3"], r"^--tp-size 3: choose 1, 2, 4 or 8$"),
    (["--ep-size", "2"], r"^--ep-size 2: expert parallelism is not supported"),
    (["--tp-step-timeout", "0"], r"^--tp-step-timeout must be positive"),
    (["--dist-init-addr", "nohost"], r"^--dist-init-addr 'nohost': expected host:port$"),
])
def test_tensor_parallel_flags_refused_by_name(tmp_path: Path, flags: list[str], message: str) -> None:
    ns = _parser().parse_args(["--model-path", str(tmp_path), "--device", "cpu", *flags])
    with pytest.raises(ValueError, match=message):
        build_worker_config("prefill", ns)


def test_tensor_parallel_flags(tmp_path: Path) -> None:
    ns = _parser().parse_args(["--model-path", str(tmp_path), "--device", "cpu", "--tp-size", "4", "--tp-backend",
                               "gloo", "--dist-init-addr", "10.0.0.1:29500", "--base-gpu-id", "2"])
    cfg, _ = build_worker_config("decode", ns)
    assert (cfg.tp_size, cfg.tp_backend, cfg.dist_init_addr, cfg.base_gpu_id) == (4, "gloo", ("10.0.0.1", 29500), 2)
