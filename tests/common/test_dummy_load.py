"""--load-format dummy: seeded random weights from config.json alone, in the checkpoint's layout.

The dummy loader runs the real loader on a virtual checkpoint; these tests pin what that promises:
two builds agree, and a TP rank's dummy weights are exactly what `load_weights` reads for that rank
from a safetensors file holding the virtual checkpoint (so every rank holds its slice of the TP 1
weights, FP8 codes and scales included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from common.model import build_model, load_model
from common.model.config import ModelConfig
from common.model.layers import LocalRank
from common.model.loader import dummy_checkpoint, dummy_weights, load_weights
from common.tools.tiny_model import TINY_CONFIG, fp8_quantization_config


def _config(tmp_path: Path, quantization: str) -> tuple[ModelConfig, Path]:
    fields = dict(TINY_CONFIG, num_hidden_layers=2, vocab_size=256)
    if quantization != "none":
        fields["quantization_config"] = fp8_quantization_config(quantization, fields, 32)
    (tmp_path / "config.json").write_text(json.dumps(fields))
    return ModelConfig.from_hf(tmp_path), tmp_path


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pa, pb = _params(a), _params(b)
    assert pa.keys() == pb.keys()
    for name, t in pa.items():
        assert t.dtype == pb[name].dtype, name
        assert torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                           pb[name].view(torch.uint8) if t.dtype == torch.float8_e4m3fn else pb[name]), name


def check_dummy_is_the_virtual_checkpoint(tmp_path: Path, quantization: str, device: str) -> None:
    """Dummy weights of every rank of TP 1 and TP 2 on `device` equal what load_weights reads for that
    rank from a safetensors file holding the TP 1 virtual checkpoint drawn on `device`."""
    config, model_dir = _config(tmp_path, quantization)
    whole = build_model(config, "meta", torch.float32, with_mtp=True)
    tensors = dummy_checkpoint(whole, config, device)
    fp8_names = {n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    assert bool(fp8_names) == (quantization != "none")
    assert "lm_head.weight" not in fp8_names and "model.embed_tokens.weight" not in fp8_names
    save_file({n: t.contiguous().cpu() for n, t in tensors.items()}, str(model_dir / "model.safetensors"))
    sizes = (1,) if quantization == "fp8-block" else (1, 2)  # 32-wide blocks: the tiny experts cannot split
    for size in sizes:
        for rank in range(size):
            tp = LocalRank(rank, size)
            dummy = build_model(config, "meta", torch.float32, with_mtp=True, tp=tp)
            dummy_weights(dummy, config, device)
            loaded = build_model(config, "meta", torch.float32, with_mtp=True, tp=tp)
            load_weights(loaded, config, model_dir, device)
            _assert_same(dummy, loaded)


@pytest.mark.parametrize("quantization", ["none", "fp8-channel", "fp8-block"])
def test_dummy_equals_loading_the_virtual_checkpoint_on_every_rank(tmp_path: Path, quantization: str) -> None:
    check_dummy_is_the_virtual_checkpoint(tmp_path, quantization, "cpu")


def test_dummy_builds_agree_and_depend_on_the_seed(tmp_path: Path) -> None:
    _, model_dir = _config(tmp_path, "none")
    a = load_model(model_dir, "cpu", torch.float32, with_mtp=True, load_format="dummy")
    b = load_model(model_dir, "cpu", torch.float32, with_mtp=True, load_format="dummy")
    _assert_same(a, b)
    config = ModelConfig.from_hf(model_dir)
    c = build_model(config, "meta", torch.float32, with_mtp=True)
    dummy_weights(c, config, "cpu", seed=1)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    norm = a.model.layers[0].input_layernorm.weight
    assert torch.equal(norm, torch.ones_like(norm))
    w = a.model.layers[0].self_attn.o_proj.weight  # N(0, 1/fan_in)
    assert abs(w.std().item() * w.shape[1] ** 0.5 - 1) < 0.1
    with pytest.raises(ValueError, match="load_format"):
        load_model(model_dir, "cpu", torch.float32, load_format="pt")


def test_fingerprint_names_the_load_format_and_ignores_files_dummy_does_not_read(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from common.worker.base import model_fingerprint

    config, model_dir = _config(tmp_path, "none")

    def fingerprint(load_format: str) -> str:
        runner = SimpleNamespace(config=config, numerics="quantize=None,fp8_compute=auto", load_format=load_format)
        return model_fingerprint(str(model_dir), runner)

    dummy, auto = fingerprint("dummy"), fingerprint("auto")
    assert dummy != auto
    (model_dir / "model.safetensors").write_bytes(b"\0" * 64)  # a stray file: weights dummy never reads
    assert fingerprint("dummy") == dummy and fingerprint("auto") != auto
