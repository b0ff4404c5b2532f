"""The tiny model written in the two FP8 checkpoint layouts: exact names, dtypes and scale shapes, the
real loader's dequantised weights within the E4M3 rounding bound of the unquantised model's, and the
FP8 model's logits within the error that E4M3 rounding predicts from the model's bf16 sensitivity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from common.forward.batch import ForwardBatch, SeqSpec
from common.model import load_model
from common.runtime.runner import ModelRunner
from common.tools.cli import main as cli_main
from common.tools.tiny_model import FP8_BLOCK, is_fp8_linear, make_tiny_model, random_weights

FORMATS = ("fp8-channel", "fp8-block")
SCALE_SUFFIX = {"fp8-channel": "_scale", "fp8-block": "_scale_inv"}
NUM_LAYERS = 3  # make_tiny_model's default; layer 3 is the MTP layer


def _tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


def _config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_fp8")
    return {q: make_tiny_model(root / q, quantization=q) for q in ("none", *FORMATS)}


def test_unquantised_default_is_unchanged(tmp_path: Path, dirs: dict[str, Path]) -> None:
    plain = make_tiny_model(tmp_path / "plain")
    for f in ("config.json", "model.safetensors"):
        assert (plain / f).read_bytes() == (dirs["none"] / f).read_bytes()
    assert "quantization_config" not in _config(plain)


def test_channel_config_is_the_official_scheme(dirs: dict[str, Path]) -> None:
    q = _config(dirs["fp8-channel"])["quantization_config"]
    assert (q["quant_method"], q["format"]) == ("compressed-tensors", "float-quantized")
    (group,) = q["config_groups"].values()
    assert group["targets"] == ["Linear"]
    w, a = group["weights"], group["input_activations"]
    assert (w["num_bits"], w["type"], w["strategy"], w["symmetric"], w["dynamic"]) == (8, "float", "channel", True, False)
    assert (a["num_bits"], a["type"], a["strategy"], a["dynamic"]) == (8, "float", "token", True)
    # lm_head and the router of every MoE layer, the MTP layer (index 3) included; layer 0 is dense.
    assert q["ignore"] == ["lm_head", "model.layers.1.mlp.gate", "model.layers.2.mlp.gate", "model.layers.3.mlp.gate"]


def test_block_config(dirs: dict[str, Path]) -> None:
    q = _config(dirs["fp8-block"])["quantization_config"]
    assert q == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                 "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
    assert FP8_BLOCK == 128


@pytest.mark.parametrize("fmt", FORMATS)
def test_names_dtypes_and_scale_shapes(dirs: dict[str, Path], fmt: str) -> None:
    plain, fp8 = _tensors(dirs["none"]), _tensors(dirs[fmt])
    suffix = SCALE_SUFFIX[fmt]
    quantised = {n for n in plain if is_fp8_linear(n)}
    assert set(fp8) == set(plain) | {n + suffix for n in quantised}
    ignore = _config(dirs["fp8-channel"])["quantization_config"]["ignore"]
    for module in ignore:
        assert fp8[module + ".weight"].dtype == torch.float32 and module + ".weight" + suffix not in fp8
    for name in quantised:
        out_f, in_f = plain[name].shape
        scale = fp8[name + suffix]
        assert fp8[name].dtype == torch.float8_e4m3fn and fp8[name].shape == (out_f, in_f), name
        expected = (out_f, 1) if fmt == "fp8-channel" else (-(-out_f // FP8_BLOCK), -(-in_f // FP8_BLOCK))
        assert scale.dtype == torch.float32 and tuple(scale.shape) == expected, name
        assert bool((scale > 0).all()), name
    for name in set(plain) - quantised:
        assert torch.equal(fp8[name], plain[name]), name  # norms, biases, embeddings, routers, lm_head
    # What must be FP8: every attention/MLP/expert linear of every layer, MTP layer and eh_proj included.
    for must in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight",
                 "model.layers.2.mlp.experts.7.up_proj.weight", "model.layers.1.mlp.shared_experts.gate_proj.weight",
                 "model.layers.3.self_attn.q_proj.weight", "model.layers.3.mlp.experts.0.down_proj.weight",
                 "model.layers.3.eh_proj.weight"):
        assert must in quantised, must
    for stays in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.gate.weight",
                  "model.layers.3.shared_head.head.weight", "model.layers.1.self_attn.q_proj.bias",
                  "model.layers.1.self_attn.q_norm.weight", "model.layers.2.mlp.gate.e_score_correction_bias"):
        assert stays in plain and stays not in quantised, stays


def _e4m3_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Largest |w - dequant(quant(w))| allowed per element. x = w/scale lies in [-448, 448]; E4M3 has 3
    mantissa bits, so round-to-nearest errs by at most half a unit in the last place: 2^-4·|x| for a
    normal x (|x| >= 2^-6) and 2^-10 for a subnormal (spacing 2^-9). Times the scale, plus a few fp32
    roundings (the division by the scale and the product on dequantisation)."""
    x = w.abs() / scale
    return torch.maximum(x * 2.0**-4, torch.full_like(x, 2.0**-10)) * scale * (1 + 2.0**-20)


@pytest.mark.parametrize("fmt", FORMATS)
def test_loaded_weights_within_e4m3_bound(dirs: dict[str, Path], fmt: str) -> None:
    """Each dequantised linear the loader produces is the unquantised one within the E4M3 bound, and the
    bound is not vacuous (the FP8 model really differs)."""
    cfg_dict = dict(_config(dirs["none"]))
    source = random_weights(cfg_dict, seed=0)
    fp8 = _tensors(dirs[fmt])
    suffix = SCALE_SUFFIX[fmt]
    model = load_model(dirs[fmt], "cpu", torch.float32, with_mtp=True, fp8_compute="dequant")
    ref = load_model(dirs["none"], "cpu", torch.float32, with_mtp=True)
    checked = 0
    for name in (n for n in source if is_fp8_linear(n)):
        w, scale = source[name], fp8[name + suffix]
        full = scale if fmt == "fp8-channel" else (
            scale.repeat_interleave(FP8_BLOCK, 0)[: w.shape[0]].repeat_interleave(FP8_BLOCK, 1)[:, : w.shape[1]])
        deq = fp8[name].float() * full
        assert bool(((w - deq).abs() <= _e4m3_bound(w, full)).all()), name
        checked += 1
    assert checked == len([n for n in source if is_fp8_linear(n)]) > 0
    differs = 0
    for (pname, p), (rname, r) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert pname == rname
        differs += not torch.equal(p, r)
        # Parameters pack several linears (qkv, gate_up, experts); bound each element by 2^-4 of the
        # largest value of its row, the loosest case of the per-element bound above.
        row_max = r.abs().amax(dim=-1, keepdim=True) if r.dim() > 1 else r.abs()
        assert bool(((p - r).abs() <= row_max * 2.0**-4 * (1 + 2.0**-20)).all()), pname
    assert differs > 0


@pytest.mark.parametrize("fmt", FORMATS)
def test_loader_dequantises_exactly(dirs: dict[str, Path], fmt: str) -> None:
    """The loader's parameters equal fp8.float() times the scale of each element's row or block, packed as
    the unquantised tensors are (checked on tensors that sit alone in a parameter or a known slice)."""
    fp8 = _tensors(dirs[fmt])
    model = load_model(dirs[fmt], "cpu", torch.float32, with_mtp=True, fp8_compute="dequant")

    def deq(name: str) -> torch.Tensor:
        w, scale = fp8[name].float(), fp8[name + SCALE_SUFFIX[fmt]]
        if fmt == "fp8-channel":
            return w * scale
        return w * scale.repeat_interleave(FP8_BLOCK, 0)[: w.shape[0]].repeat_interleave(FP8_BLOCK, 1)[:, : w.shape[1]]

    cfg = model.config
    assert torch.equal(model.model.layers[0].mlp.down_proj.weight, deq("model.layers.0.mlp.down_proj.weight"))
    assert torch.equal(model.model.layers[2].self_attn.o_proj.weight, deq("model.layers.2.self_attn.o_proj.weight"))
    assert torch.equal(model.model.layers[1].mlp.experts.w2[3], deq("model.layers.1.mlp.experts.3.down_proj.weight"))
    assert torch.equal(model.model.layers[2].mlp.experts.w13[cfg.n_routed_experts, cfg.moe_intermediate_size:],
                       deq("model.layers.2.mlp.shared_experts.up_proj.weight"))
    assert torch.equal(model.mtp.eh_proj.weight, deq("model.layers.3.eh_proj.weight"))


def test_small_block_gives_several_blocks(tmp_path: Path) -> None:
    d = make_tiny_model(tmp_path / "b16", quantization="fp8-block", fp8_block=16)
    assert _config(d)["quantization_config"]["weight_block_size"] == [16, 16]
    t = _tensors(d)
    assert t["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (64 // 16, 96 // 16)
    model = load_model(d, "cpu", torch.float32, with_mtp=True, fp8_compute="dequant")
    ref = load_model(make_tiny_model(tmp_path / "plain"), "cpu", torch.float32, with_mtp=True)
    w, r = model.model.layers[0].mlp.down_proj.weight, ref.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(w, r) and bool(((w - r).abs() <= r.abs().max() * 2.0**-4).all())


def _prompt_logits(model_dir: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    r = ModelRunner(model_dir, "cpu", dtype, page_size=16, num_pages=8)
    ids = torch.randint(0, 800, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    pages = r.allocator.alloc(2)
    assert pages is not None
    logits, _ = r.forward(ForwardBatch.build([SeqSpec(ids, list(range(24)), 24, pages,
                                                      logit_rows=list(range(24)))], 16))
    return logits


def _mean_rel_err(a: torch.Tensor, truth: torch.Tensor) -> float:
    return float(((a - truth).norm(dim=-1) / truth.norm(dim=-1)).mean())


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp8_logits_within_the_predicted_error(tmp_path: Path, dirs: dict[str, Path], fmt: str) -> None:
    """The bound comes from the model's own sensitivity: the same weights rounded to bf16 (7 mantissa
    bits) move the logits by some mean relative error e_bf16; E4M3 (3 mantissa bits) has a rounding
    unit 2^4 = 16 times bf16's, so its error should be about 16·e_bf16. Allow 2x that. (The largest
    per-position error is not bounded this way: a tiny change can flip a top-k routing choice.)"""
    truth = _prompt_logits(dirs["none"])
    e_bf16 = _mean_rel_err(_prompt_logits(make_tiny_model(tmp_path / "bf16", weight_dtype=torch.bfloat16)), truth)
    e_fp8 = _mean_rel_err(_prompt_logits(dirs[fmt]), truth)
    assert 0 < e_bf16 < 0.05
    assert e_bf16 < e_fp8 <= 2 * 16 * e_bf16


def test_cli_flag(tmp_path: Path) -> None:
    assert cli_main(["make-tiny-model", str(tmp_path / "c"), "--quantization", "fp8-channel"]) == 0
    assert _config(tmp_path / "c")["quantization_config"]["quant_method"] == "compressed-tensors"
    assert cli_main(["make-tiny-model", str(tmp_path / "b"), "--quantization", "fp8-block"]) == 0
    assert _config(tmp_path / "b")["quantization_config"]["quant_method"] == "fp8"


@pytest.mark.parametrize("fmt", FORMATS)
def test_sharded_fp8_loads_as_single(tmp_path: Path, dirs: dict[str, Path], fmt: str) -> None:
    """Shards split the name list; pick a shard count that puts some scale in another file than its
    weight, and check the load equals the single file's."""
    suffix = SCALE_SUFFIX[fmt]
    for shards in range(2, 16):
        sharded = make_tiny_model(tmp_path / f"s{shards}", quantization=fmt, shards=shards)
        index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
        if any(index[n] != index[n + suffix] for n in index if n + suffix in index):
            break
    else:
        pytest.fail("no shard count split a weight from its scale")
    a = dict(load_model(dirs[fmt], "cpu", torch.float32, with_mtp=True).named_parameters())
    b = dict(load_model(sharded, "cpu", torch.float32, with_mtp=True).named_parameters())
    assert a.keys() == b.keys()
    assert all(a[n].dtype == b[n].dtype and torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8))
               if a[n].dtype == torch.float8_e4m3fn else torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("fmt", FORMATS)
def test_bf16_rest_matches_the_official_dtypes(tmp_path: Path, fmt: str) -> None:
    """With weight_dtype=bf16 every dtype is the official checkpoints': FP8 linears, fp32 scales, the
    fp32 correction bias, and bf16 for everything else (embeddings, lm_head, routers, norms, biases)."""
    t = _tensors(make_tiny_model(tmp_path / "m", quantization=fmt, weight_dtype=torch.bfloat16))
    suffix = SCALE_SUFFIX[fmt]
    for name, tensor in t.items():
        if is_fp8_linear(name):
            want = torch.float8_e4m3fn
        elif name.endswith((suffix, "e_score_correction_bias")):
            want = torch.float32
        else:
            want = torch.bfloat16
        assert tensor.dtype == want, name


@pytest.mark.parametrize("fmt", FORMATS)
def test_moe_rows_summed_by_the_next_norm_change_nothing(dirs: dict[str, Path], fmt: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The FP8 MoE's rows handed unsummed to the next add + norm (every layer's, the final norm's)
    give the logits of the MoE's own combine bit for bit, and the layer really hands rows on (the
    block format's tiny experts are not whole blocks, so they run dequantised and combine as before)."""
    import common.model.moe as moe_block

    seen: list[tuple[bool, int]] = []
    monkeypatch.setattr(moe_block, "COMBINE_IN_NORM", False)
    combined = _prompt_logits(dirs[fmt])
    monkeypatch.setattr(moe_block, "COMBINE_IN_NORM", True)
    forward = moe_block.MoE.forward

    def spy(self, x, combine=True):  # type: ignore[no-untyped-def]
        out = forward(self, x, combine)
        seen.append((self.experts.fp8_block is not None, out.dim()))
        return out

    monkeypatch.setattr(moe_block.MoE, "forward", spy)
    assert torch.equal(_prompt_logits(dirs[fmt]), combined)
    assert seen and all(dim == (3 if fp8 else 2) for fp8, dim in seen)
    assert any(fp8 for fp8, _ in seen) == (fmt == "fp8-channel")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the fp32 slices must not leak
def test_split_k_slices_summed_by_the_next_norm_change_nothing(dirs: dict[str, Path], dtype: torch.dtype,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """o_proj handing its (here: one fp32) slices to the next add + norm gives the same logits, and the
    attention really hands them on; the activations after the norm keep the model's dtype."""
    import common.model.glm4_moe as glm
    import common.model.layers as model_layers

    monkeypatch.setattr(model_layers, "SPLIT_K_IN_NORM", False)
    summed = _prompt_logits(dirs["fp8-channel"], dtype)
    monkeypatch.setattr(model_layers, "SPLIT_K_IN_NORM", True)
    seen: list[int] = []
    forward = glm.Glm4MoeAttention.forward

    def spy(self, positions, x, unsummed=False):  # type: ignore[no-untyped-def]
        out = forward(self, positions, x, unsummed)
        seen.append(out.dim())
        return out

    monkeypatch.setattr(glm.Glm4MoeAttention, "forward", spy)
    assert torch.equal(_prompt_logits(dirs["fp8-channel"], dtype), summed)
    assert seen and set(seen) == {3}


def test_head_amax_handed_to_o_proj_changes_nothing(dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """With the attention handing o_proj each head's max |o| (layers.AMAX_HANDOFF_ROWS), the FP8 model's
    logits are the same, and what reaches o_proj is the head amax of its input."""
    import common.model.layers as model_layers

    monkeypatch.setattr(model_layers, "AMAX_HANDOFF_ROWS", 0)
    plain = _prompt_logits(dirs["fp8-channel"])
    monkeypatch.setattr(model_layers, "AMAX_HANDOFF_ROWS", 1 << 20)
    seen: list[bool] = []
    forward = model_layers.RowParallelLinear.forward

    def spy(self, x, unsummed=False, x_amax=None):  # type: ignore[no-untyped-def]
        if x_amax is not None:
            heads = x_amax.shape[1]
            seen.append(torch.equal(x_amax, x.float().abs().view(x.shape[0], heads, -1).amax(-1)))
        return forward(self, x, unsummed, x_amax)

    monkeypatch.setattr(model_layers.RowParallelLinear, "forward", spy)
    assert torch.equal(_prompt_logits(dirs["fp8-channel"]), plain)
    assert seen and all(seen)
