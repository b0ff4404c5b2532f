"""The safetensors loader: single file == sharded, exact placement, fp32 router, MTP keys, FP8
dequantisation, and errors that name the file and the tensor."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from common.model import LoadError, build_model, load_model
from common.model.config import ModelConfig
from common.model.loader import checkpoint_layout, load_weights
from common.ops import reference
from common.tools.tiny_model import make_tiny_model


def _tiny(tmp_path: Path, name: str = "m", **kw) -> Path:
    return make_tiny_model(tmp_path / name, **kw)


def _rewrite(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_single_and_sharded_load_identically(tmp_path: Path) -> None:
    single = load_model(_tiny(tmp_path, "single"), "cpu", torch.float32, with_mtp=True)
    sharded_dir = _tiny(tmp_path, "sharded", shards=3)
    assert (sharded_dir / "model.safetensors.index.json").exists()
    assert not (sharded_dir / "model.safetensors").exists()
    sharded = load_model(sharded_dir, "cpu", torch.float32, with_mtp=True)
    a, b = dict(single.named_parameters()), dict(sharded.named_parameters())
    assert a.keys() == b.keys()
    for name, param in a.items():
        assert torch.equal(param, b[name]), name
        assert not param.is_meta and param.device.type == "cpu"


def test_tensors_land_where_the_spec_says(tiny_model_dir: Path) -> None:
    raw = load_file(str(tiny_model_dir / "model.safetensors"))
    model = load_model(tiny_model_dir, "cpu", torch.float32, with_mtp=True)
    cfg = model.config
    q, kv, inter = cfg.q_size, cfg.kv_size, cfg.moe_intermediate_size
    attn = model.model.layers[2].self_attn
    assert torch.equal(attn.qkv_proj.weight[q : q + kv], raw["model.layers.2.self_attn.k_proj.weight"])
    assert torch.equal(attn.qkv_proj.bias[q + kv :], raw["model.layers.2.self_attn.v_proj.bias"])
    experts = model.model.layers[1].mlp.experts
    assert torch.equal(experts.w13[5, :inter], raw["model.layers.1.mlp.experts.5.gate_proj.weight"])
    assert torch.equal(experts.w13[5, inter:], raw["model.layers.1.mlp.experts.5.up_proj.weight"])
    assert torch.equal(experts.w2[7], raw["model.layers.1.mlp.experts.7.down_proj.weight"])
    dense = model.model.layers[0].mlp
    assert torch.equal(dense.gate_up_proj.weight[cfg.intermediate_size :], raw["model.layers.0.mlp.up_proj.weight"])
    e = cfg.n_routed_experts  # the shared expert is stacked after the routed ones
    assert torch.equal(experts.w13[e, :inter], raw["model.layers.1.mlp.shared_experts.gate_proj.weight"])
    assert torch.equal(experts.w13[e, inter:], raw["model.layers.1.mlp.shared_experts.up_proj.weight"])
    assert torch.equal(experts.w2[e], raw["model.layers.1.mlp.shared_experts.down_proj.weight"])
    L = cfg.num_hidden_layers
    assert torch.equal(model.mtp.eh_proj.weight, raw[f"model.layers.{L}.eh_proj.weight"])
    assert torch.equal(model.mtp.shared_head_norm.weight, raw[f"model.layers.{L}.shared_head.norm.weight"])
    assert torch.equal(model.mtp.decoder.mlp.gate.e_score_correction_bias,
                       raw[f"model.layers.{L}.mlp.gate.e_score_correction_bias"])
    assert model.mtp.embed_tokens is model.model.embed_tokens


def test_layout_is_exactly_the_checkpoint(tiny_model_dir: Path) -> None:
    cfg = ModelConfig.from_hf(tiny_model_dir)
    names = set(load_file(str(tiny_model_dir / "model.safetensors")))
    L = cfg.num_hidden_layers
    copies = {f"model.layers.{L}.shared_head.head.weight", f"model.layers.{L}.embed_tokens.weight"}
    with_mtp = set(checkpoint_layout(build_model(cfg, "meta", torch.float32, with_mtp=True), cfg))
    assert with_mtp == names - copies
    without = set(checkpoint_layout(build_model(cfg, "meta", torch.float32), cfg))
    assert without == {n for n in names if not n.startswith(f"model.layers.{L}.")}


def test_bf16_keeps_router_fp32(tiny_model_dir: Path) -> None:
    raw = load_file(str(tiny_model_dir / "model.safetensors"))
    model = load_model(tiny_model_dir, "cpu", torch.bfloat16, with_mtp=True)
    gate = model.model.layers[1].mlp.gate
    assert gate.e_score_correction_bias.dtype == torch.float32 and gate.weight.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, raw["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert torch.equal(gate.weight, raw["model.layers.1.mlp.gate.weight"])
    assert model.mtp.decoder.mlp.gate.e_score_correction_bias.dtype == torch.float32
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.experts.w13.dtype == torch.bfloat16
    assert torch.equal(model.lm_head.weight, raw["lm_head.weight"].bfloat16())


def test_mtp_copies_ignored_and_mtp_optional(tmp_path: Path) -> None:
    d = _tiny(tmp_path)
    L = ModelConfig.from_hf(d).num_hidden_layers

    def scramble(t: dict[str, torch.Tensor]) -> None:
        t[f"model.layers.{L}.shared_head.head.weight"] = torch.zeros_like(t["lm_head.weight"])
        t[f"model.layers.{L}.embed_tokens.weight"] = torch.zeros_like(t["model.embed_tokens.weight"])

    _rewrite(d / "model.safetensors", scramble)
    raw = load_file(str(d / "model.safetensors"))
    model = load_model(d, "cpu", torch.float32, with_mtp=True)
    assert torch.equal(model.model.embed_tokens.weight, raw["model.embed_tokens.weight"])
    target_only = load_model(d, "cpu", torch.float32, with_mtp=False)
    assert target_only.mtp is None
    assert not any(n.startswith("mtp.") for n, _ in target_only.named_parameters())


def test_with_mtp_needs_nextn_layer(tmp_path: Path) -> None:
    d = _tiny(tmp_path, num_nextn_predict_layers=0)
    assert load_model(d, "cpu", torch.float32).mtp is None
    with pytest.raises(LoadError, match="num_nextn_predict_layers"):
        load_model(d, "cpu", torch.float32, with_mtp=True)


# ------------------------------------------------------------------------------ errors
def test_missing_tensor_names_file_and_tensor(tmp_path: Path) -> None:
    d = _tiny(tmp_path)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _rewrite(d / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(LoadError, match=rf"model\.safetensors.*'{name}'") as e:
        load_model(d, "cpu", torch.float32)
    assert "missing" in str(e.value)


def test_missing_mtp_tensor_only_matters_with_mtp(tmp_path: Path) -> None:
    d = _tiny(tmp_path)
    name = f"model.layers.{ModelConfig.from_hf(d).num_hidden_layers}.hnorm.weight"
    _rewrite(d / "model.safetensors", lambda t: t.pop(name))
    load_model(d, "cpu", torch.float32, with_mtp=False)
    with pytest.raises(LoadError, match=name.replace(".", r"\.")):
        load_model(d, "cpu", torch.float32, with_mtp=True)


def test_sharded_index_mismatch_names_shard_and_tensor(tmp_path: Path) -> None:
    d = _tiny(tmp_path, shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    name = "model.layers.2.self_attn.o_proj.weight"
    shard = d / index["weight_map"][name]
    _rewrite(shard, lambda t: t.pop(name))
    with pytest.raises(LoadError, match=rf"{shard.name}.*'{name}'"):
        load_model(d, "cpu", torch.float32)
    del index["weight_map"][name]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(LoadError, match=rf"index\.json.*missing tensor '{name}'"):
        load_model(d, "cpu", torch.float32)


def test_unexpected_tensor_names_file_and_tensor(tmp_path: Path) -> None:
    d = _tiny(tmp_path)
    name = "model.layers.0.mlp.experts.0.gate_proj.weight"  # layer 0 is dense
    _rewrite(d / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(32, 64)))
    with pytest.raises(LoadError, match=rf"model\.safetensors.*unexpected tensor '{name}'"):
        load_model(d, "cpu", torch.float32)


def test_misshaped_tensor_names_file_tensor_and_shapes(tmp_path: Path) -> None:
    d = _tiny(tmp_path)
    name = "model.layers.2.self_attn.k_proj.weight"
    _rewrite(d / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(63, 64)))
    with pytest.raises(LoadError, match=rf"model\.safetensors.*'{name}'.*\(63, 64\).*\(64, 64\)"):
        load_model(d, "cpu", torch.float32)


def test_truncated_file_names_file_and_tensor(tmp_path: Path) -> None:
    d = _tiny(tmp_path, shards=2)
    shard = sorted(d.glob("model-*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:-100])
    with pytest.raises(LoadError, match=rf"{shard.name}.*truncated.*tensor '[^']+'"):
        load_model(d, "cpu", torch.float32)
    shard.write_bytes(data[:5])
    with pytest.raises(LoadError, match=shard.name):
        load_model(d, "cpu", torch.float32)


# ------------------------------------------------------------------------------ FP8
FP8 = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight",
       "model.layers.2.mlp.experts.4.gate_proj.weight", "model.layers.3.eh_proj.weight"]


def _quantize(d: Path, block: int | None, stored: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Turn FP8 names into float8_e4m3fn + scales; return the dequantised values expected (and
    put the stored FP8 tensors and scales into `stored`)."""
    expected: dict[str, torch.Tensor] = {}
    stored = {} if stored is None else stored

    def edit(t: dict[str, torch.Tensor]) -> None:
        for name in FP8:
            w = t[name]
            if block is None:
                scale = w.abs().amax(dim=1, keepdim=True) / 448.0  # [out,1]
                q = (w / scale).to(torch.float8_e4m3fn)
                t[name + "_scale"] = scale
                expected[name] = q.float() * scale
            else:
                rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
                scale = torch.rand(rows, cols) * 0.01 + 0.001
                full = scale.repeat_interleave(block, 0)[: w.shape[0]].repeat_interleave(block, 1)[:, : w.shape[1]]
                q = (w / full).to(torch.float8_e4m3fn)
                t[name + "_scale_inv"] = scale
                expected[name] = q.float() * full
            t[name] = q
            stored[name] = q
            stored[name + "_scale"] = t.get(name + "_scale", t.get(name + "_scale_inv"))

    _rewrite(d / "model.safetensors", edit)
    return expected


@pytest.mark.parametrize("block", [None, 16], ids=["channel", "block16"])
def test_fp8_dequantised_on_load(tmp_path: Path, block: int | None) -> None:
    quant = ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 8, "type": "float", "strategy": "channel"}}}} if block is None
        else {"quant_method": "fp8", "weight_block_size": [block, block]})
    d = _tiny(tmp_path, quantization_config=quant)
    expected = _quantize(d, block)
    model = load_model(d, "cpu", torch.float32, with_mtp=True, fp8_compute="dequant")
    cfg = model.config
    assert torch.equal(model.model.layers[1].self_attn.qkv_proj.weight[: cfg.q_size], expected[FP8[0]])
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, expected[FP8[1]])
    assert torch.equal(model.model.layers[2].mlp.experts.w13[4, : cfg.moe_intermediate_size], expected[FP8[2]])
    assert torch.equal(model.mtp.eh_proj.weight, expected[FP8[3]])
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("block", [None, 16], ids=["channel", "block16"])
def test_fp8_kept_where_whole_modules_are_fp8(tmp_path: Path, block: int | None) -> None:
    """A module whose every weight is FP8 keeps the stored bytes and scales; a module only partly
    FP8 (q of q|k|v, one expert of the stack) is dequantised."""
    quant = ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 8, "type": "float", "strategy": "channel"}}}} if block is None
        else {"quant_method": "fp8", "weight_block_size": [block, block]})
    d = _tiny(tmp_path, quantization_config=quant)
    stored: dict[str, torch.Tensor] = {}
    expected = _quantize(d, block, stored)
    model = load_model(d, "cpu", torch.float32, with_mtp=True)
    cfg = model.config
    qkv, experts = model.model.layers[1].self_attn.qkv_proj, model.model.layers[2].mlp.experts
    assert qkv.fp8_block is None and torch.equal(qkv.weight[: cfg.q_size], expected[FP8[0]])
    assert experts.fp8_block is None and torch.equal(experts.w13[4, : cfg.moe_intermediate_size], expected[FP8[2]])
    for module, name in ((model.model.layers[0].mlp.down_proj, FP8[1]), (model.mtp.eh_proj, FP8[3])):
        assert module.fp8_block == (block or 0)
        assert module.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(module.weight.view(torch.uint8), stored[name].view(torch.uint8))
        assert torch.equal(module.weight_scale, stored[name + "_scale"])


def test_fp8_without_scale_is_refused(tmp_path: Path) -> None:
    d = _tiny(tmp_path)
    name = FP8[0]
    _rewrite(d / "model.safetensors", lambda t: t.__setitem__(name, t[name].to(torch.float8_e4m3fn)))
    with pytest.raises(LoadError, match=rf"'{name}'.*scale"):
        load_model(d, "cpu", torch.float32)


def test_two_shared_experts_split_into_stacked_experts(tmp_path: Path) -> None:
    """A shared MLP of width 2I loads as two stacked experts of width I, and the MoE block still
    computes routed + down(silu(gate x) * up x) of the whole shared MLP."""
    path = _tiny(tmp_path, n_shared_experts=2)
    raw = load_file(str(path / "model.safetensors"))
    model = load_model(path, "cpu", torch.float32)
    cfg = model.config
    moe = model.model.layers[1].mlp
    assert moe.experts.w13.shape[0] == cfg.n_routed_experts + 2
    p = "model.layers.1.mlp.shared_experts."
    gate, up, down = (raw[p + f"{x}_proj.weight"] for x in ("gate", "up", "down"))
    x = torch.randn(5, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights, ids = reference.grouped_topk(moe.gate(x), moe.gate.e_score_correction_bias, cfg.num_experts_per_tok,
                                              cfg.n_group, cfg.topk_group, cfg.norm_topk_prob,
                                              cfg.routed_scaling_factor)
        routed = reference.fused_moe(x, moe.experts.w13[: cfg.n_routed_experts], moe.experts.w2[: cfg.n_routed_experts],
                                     weights, ids)
        shared = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
        torch.testing.assert_close(moe(x), routed + shared, rtol=1e-5, atol=1e-5)


def test_mis_shaped_shared_expert_names_the_checkpoint_shape(tmp_path: Path) -> None:
    path = _tiny(tmp_path)
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"
    _rewrite(path / "model.safetensors", lambda t: t.update({name: t[name][:, :-1].contiguous()}))
    cfg = ModelConfig.from_hf(path)
    with pytest.raises(LoadError, match=rf"'{name}' has shape \({cfg.hidden_size}, {cfg.moe_intermediate_size - 1}\), "
                                        rf"expected \({cfg.hidden_size}, {cfg.moe_intermediate_size}\)"):
        load_model(path, "cpu", torch.float32)


def test_shards_load_one_after_another_with_a_progress_line_each(tmp_path: Path, caplog) -> None:
    d = _tiny(tmp_path, shards=3)
    files = sorted(d.glob("*.safetensors"))
    config = ModelConfig.from_hf(d)
    model = build_model(config, "meta", torch.float32, with_mtp=True)
    with caplog.at_level(logging.INFO, logger="common.model.loader"):
        stats = load_weights(model, config, d, "cpu")
    lines = [r.getMessage() for r in caplog.records if r.name == "common.model.loader"]
    assert [line.split(" (")[0] for line in lines] == ["loaded shard 1/3", "loaded shard 2/3", "loaded shard 3/3"]
    assert [line.split("(")[1].split(")")[0] for line in lines] == [f.name for f in files]  # in file order
    read = [float(line.split(": ")[1].split("/")[0]) for line in lines]
    assert read == sorted(read) and read[0] > 0
    total = sum(f.stat().st_size for f in files)
    # every tensor but the MTP layer's embed / head copies is read once; headers are not counted
    assert stats.shards == 3 and 0.5 * total < stats.bytes_read < total and stats.gb_per_s > 0
