"""FP8 weights stay FP8 through the real loader: which modules, the stored bytes and scales unchanged,
per-tensor scales widened to rows, block scales kept where whole blocks fit and dequantised (with a
log line) where they do not, on-load quantisation of a high-precision checkpoint, and refusals that
name the file and the tensor."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.model import LoadError, load_model
from common.model.loader import fp8_capable
from common.ops import reference
from common.tools.tiny_model import make_tiny_model

FP8 = torch.float8_e4m3fn


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def _rewrite(d: Path, edit) -> None:
    tensors = load_file(str(d / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.fixture(scope="module")
def channel_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("ch") / "m", quantization="fp8-channel")


def test_channel_checkpoint_keeps_every_quantised_module_fp8(channel_dir: Path) -> None:
    model = load_model(channel_dir, "cpu", torch.float32, with_mtp=True)
    stored = _tensors(channel_dir)
    capable = fp8_capable(model)
    assert "lm_head" not in capable and "mtp.eh_proj" in capable and "model.layers.1.mlp.experts" in capable
    for name in capable:
        assert model.get_submodule(name).fp8_block == 0, name
    # no high-precision copy of an FP8 tensor: bytes and scales as stored
    cfg = model.config
    qkv = model.model.layers[1].self_attn.qkv_proj
    assert qkv.weight.dtype == FP8 and qkv.weight_scale.shape == (qkv.out_features, 1)
    assert torch.equal(_bits(qkv.weight[qkv.rows("k_proj")]), _bits(stored["model.layers.1.self_attn.k_proj.weight"]))
    assert torch.equal(qkv.weight_scale[qkv.rows("v_proj")], stored["model.layers.1.self_attn.v_proj.weight_scale"])
    experts = model.model.layers[2].mlp.experts
    e, i = 5, cfg.moe_intermediate_size
    assert torch.equal(_bits(experts.w13[e, i:]), _bits(stored[f"model.layers.2.mlp.experts.{e}.up_proj.weight"]))
    assert torch.equal(experts.w13_scale[e, :i], stored[f"model.layers.2.mlp.experts.{e}.gate_proj.weight_scale"])
    assert torch.equal(experts.w2_scale[cfg.n_routed_experts],
                       stored["model.layers.2.mlp.shared_experts.down_proj.weight_scale"])
    # what the official checkpoints leave high precision stays so
    assert model.lm_head.fp8_block is None and model.lm_head.weight.dtype == torch.float32
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_per_tensor_scale_becomes_one_per_row(tmp_path: Path) -> None:
    """A checkpoint with one scale per tensor loads as per-row scales of that value (exact)."""
    d = make_tiny_model(tmp_path / "m", quantization="fp8-channel")
    name = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(d, lambda t: t.__setitem__(name + "_scale", torch.tensor(0.0125)))
    o = load_model(d, "cpu", torch.float32).model.layers[0].self_attn.o_proj
    assert o.fp8_block == 0 and torch.equal(o.weight_scale, torch.full((o.out_features, 1), 0.0125))


def test_block_scales_kept_where_whole_blocks_fit(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Block 16 tiles every tiny linear and expert stack: all FP8 with their block scales. Block 128
    fits only the linears whose input is 128 wide (o_proj, eh_proj; a partial last row block is
    fine): the rest is dequantised, and the log says so and why."""
    d16 = make_tiny_model(tmp_path / "b16", quantization="fp8-block", fp8_block=16)
    model = load_model(d16, "cpu", torch.float32, with_mtp=True)
    stored = _tensors(d16)
    assert all(model.get_submodule(n).fp8_block == 16 for n in fp8_capable(model))
    qkv = model.model.layers[2].self_attn.qkv_proj
    assert qkv.weight_scale.shape == (qkv.out_features // 16, qkv.in_features // 16)
    assert torch.equal(qkv.weight_scale[qkv.scale_rows(qkv.rows("k_proj"))],
                       stored["model.layers.2.self_attn.k_proj.weight_scale_inv"])
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts.w2_scale[3], stored["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"])

    d128 = make_tiny_model(tmp_path / "b128", quantization="fp8-block")
    with caplog.at_level(logging.INFO, logger="common.model.loader"):
        model = load_model(d128, "cpu", torch.float32, with_mtp=True)
    kept = {n for n in fp8_capable(model) if model.get_submodule(n).fp8_block == 128}
    assert kept == {f"model.layers.{i}.self_attn.o_proj" for i in range(3)} | {"mtp.decoder.self_attn.o_proj",
                                                                               "mtp.eh_proj"}
    assert all(model.get_submodule(n).weight.dtype == torch.float32 for n in fp8_capable(model)
               if n not in kept and not n.endswith("experts"))
    assert any("dequantised on load" in r.message and "128x128" in r.message for r in caplog.records)


def test_quantize_on_load(tmp_path: Path) -> None:
    """quantize="fp8" on a high-precision checkpoint: the official set of modules becomes FP8 per
    output channel, each row quantised by the same rule as the activations (amax / 448)."""
    d = make_tiny_model(tmp_path / "m", n_shared_experts=2)
    source = _tensors(d)
    model = load_model(d, "cpu", torch.float32, with_mtp=True, quantize="fp8")
    assert all(model.get_submodule(n).fp8_block == 0 for n in fp8_capable(model))
    assert model.lm_head.fp8_block is None
    o = model.model.layers[1].self_attn.o_proj
    q, s = reference.quant_fp8_per_token(source["model.layers.1.self_attn.o_proj.weight"])
    assert torch.equal(_bits(o.weight), _bits(q)) and torch.equal(o.weight_scale, s)
    # two shared experts cut from one MLP: the down projection's per-row scale serves both halves
    experts, first = model.model.layers[2].mlp.experts, model.config.n_routed_experts
    q, s = reference.quant_fp8_per_token(source["model.layers.2.mlp.shared_experts.down_proj.weight"])
    assert torch.equal(experts.w2_scale[first], s) and torch.equal(experts.w2_scale[first + 1], s)
    assert torch.equal(_bits(experts.w2[first + 1]), _bits(q[:, q.shape[1] // 2:]))


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight_scale", torch.ones(3, 1)),
     r"model\.layers\.0\.mlp\.up_proj\.weight_scale.*shape \(3, 1\)"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight_scale",
                             -t["model.layers.0.mlp.up_proj.weight_scale"]),
     r"model\.layers\.0\.mlp\.up_proj\.weight_scale.*non-negative"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.input_scale", torch.tensor(1.0)),
     r"model\.layers\.0\.mlp\.up_proj\.input_scale.*static activation scale"),
    (lambda t: t.__setitem__("model.layers.0.mlp.nothing.weight_scale", torch.ones(2, 1)),
     r"model\.layers\.0\.mlp\.nothing\.weight_scale.*has no weight"),
    (lambda t: t.pop("model.layers.1.self_attn.q_proj.weight_scale"),
     r"'model\.layers\.1\.self_attn\.q_proj\.weight' has no 'model\.layers\.1\.self_attn\.q_proj\.weight_scale'"),
], ids=["shape", "negative", "input-scale", "orphan-scale", "missing-scale"])
def test_refusals_name_file_and_tensor(tmp_path: Path, edit, match: str) -> None:
    d = make_tiny_model(tmp_path / "m", quantization="fp8-channel")
    _rewrite(d, edit)
    with pytest.raises(LoadError, match=match) as info:
        load_model(d, "cpu", torch.float32)
    assert "model.safetensors" in str(info.value)


def test_moe_takes_its_input_quantised_by_the_norm(channel_dir: Path) -> None:
    """The post-attention norm hands the MoE both its normed value (router) and that value quantised
    (experts): the MoE output is bit-equal to quantising inside the fused MoE."""
    from common import ops

    layer = load_model(channel_dir, "cpu", torch.float32).model.layers[1]
    x, residual = torch.randn(2, 5, layer.mlp.gate.weight.shape[1]).unbind(0)
    norm = layer.post_attention_layernorm
    quantised, _ = norm.add_and_norm(x, residual, layer.mlp.input_fp8_block, layer.mlp.input_needs_normed)
    plain, _ = ops.fused_add_rms_norm(x, residual, norm.weight, norm.eps)
    assert torch.equal(quantised.normed, plain)
    assert torch.equal(layer.mlp(quantised), layer.mlp(plain))
