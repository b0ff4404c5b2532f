"""Worker flags: a worker accepts the flags of a shared SGLang launch line (the gateway's too) and
uses only its own; the thinking budget stays the gateway's; the tensor-parallel flags, and the
refusal of what cannot run, by flag."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

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


@pytest.mark.parametrize(("value", "message"), [
    ("fp8_e4m3", r"^--kv-cache-dtype fp8_e4m3: an FP8 KV cache is not offered"),
    ("fp8_e5m2", r"^--kv-cache-dtype fp8_e5m2: an FP8 KV cache is not offered"),
    ("bf16", r"^--kv-cache-dtype bf16: the KV pool holds the compute dtype; choose auto or float32 \(the compute"),
])
def test_kv_cache_dtype_other_than_the_compute_dtype_is_refused(tmp_path: Path, value: str, message: str) -> None:
    ns = _parser().parse_args(["--model-path", str(tmp_path), "--device", "cpu", "--kv-cache-dtype", value])
    with pytest.raises(ValueError, match=message):
        build_worker_config("prefill", ns)


@pytest.mark.parametrize(("value", "dtype"), [("auto", "auto"), ("bf16", "bfloat16"), ("bfloat16", "bfloat16"),
                                              ("float32", "auto")])
def test_kv_cache_dtype_naming_the_compute_dtype_is_taken(tmp_path: Path, value: str, dtype: str) -> None:
    (tmp_path / "config.json").write_text("{}")
    ns = _parser().parse_args(["--model-path", str(tmp_path), "--device", "cpu", "--dtype", dtype,
                               "--kv-cache-dtype", value, "--load-format", "dummy"])
    cfg, _ = build_worker_config("prefill", ns)
    assert cfg.dtype == ("float32" if dtype == "auto" else dtype)


def test_max_total_tokens_sizes_the_pool_in_whole_pages(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    base = ["--model-path", str(tmp_path), "--device", "cpu", "--load-format", "dummy", "--page-size", "16"]
    cfg, _ = build_worker_config("decode", _parser().parse_args([*base, "--max-total-tokens", "1000"]))
    assert cfg.num_pages == 63  # 1000 tokens: 62.5 pages of 16, rounded up
    cfg, _ = build_worker_config("decode", _parser().parse_args([*base, "--num-pages", "7"]))
    assert cfg.num_pages == 7
    for extra in (["--max-total-tokens", "1000", "--num-pages", "7"], ["--max-total-tokens", "-5"]):
        with pytest.raises(ValueError, match=r"^--max-total-tokens -?\d+: give a positive token count"):
            build_worker_config("decode", _parser().parse_args([*base, *extra]))


def test_tensor_parallel_flags(tmp_path: Path) -> None:
    ns = _parser().parse_args(["--model-path", str(tmp_path), "--device", "cpu", "--tp-size", "4", "--tp-backend",
                               "gloo", "--dist-init-addr", "10.0.0.1:29500", "--base-gpu-id", "2"])
    cfg, _ = build_worker_config("decode", ns)
    assert (cfg.tp_size, cfg.tp_backend, cfg.dist_init_addr, cfg.base_gpu_id) == (4, "gloo", ("10.0.0.1", 29500), 2)


def test_grammar_flags(tmp_path: Path) -> None:
    base = ["--model-path", str(tmp_path), "--device", "cpu"]
    cfg, _ = build_worker_config("decode", _parser().parse_args(base))
    assert (cfg.grammar_backend, cfg.grammar_compile_timeout) == ("xgrammar", 10.0)
    cfg, _ = build_worker_config("prefill", _parser().parse_args(
        [*base, "--grammar-backend", "llguidance", "--grammar-compile-timeout", "2.5"]))
    assert (cfg.grammar_backend, cfg.grammar_compile_timeout) == ("llguidance", 2.5)
    cfg, _ = build_worker_config("decode", _parser().parse_args([*base, "--grammar-backend", "none"]))
    assert cfg.grammar_backend == "none"
    with pytest.raises(SystemExit):  # argparse refuses an unknown engine
        _parser().parse_args([*base, "--grammar-backend", "outlines"])
    with pytest.raises(ValueError, match=r"^--grammar-compile-timeout must be positive, got 0.0$"):
        build_worker_config("decode", _parser().parse_args([*base, "--grammar-compile-timeout", "0"]))
