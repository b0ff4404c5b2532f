"""A complete, tiny, random-weight GLM-4 MoE model directory in Hugging Face format, for tests.

`make_tiny_model(out_dir)` writes config.json (every field explicit, and every path of the model
exercised: QK-norm, q/k/v bias, partial RoPE, group-limited routing with a nonzero correction
bias, a dense first layer, a shared expert, routed scaling), the weights (model.safetensors, or
shards plus model.safetensors.index.json), the MTP layer under `model.layers.{L}.*` with its
`shared_head.head` / `embed_tokens` copies, and the tokenizer files of common.tools.tiny_tokenizer.

Weights are stored in fp32 so that fp32 comparisons see exactly the same numbers in every loader;
config.json still says `torch_dtype: bfloat16`, as the real checkpoints do. Norm weights are
1 + 0.1·N(0,1), biases 0.1·N(0,1), correction biases 0.05·N(0,1), projections N(0, 1/fan_in),
so hidden states and logits are O(1). Same arguments → byte-identical files.

`quantization="fp8-channel"` or `"fp8-block"` writes the same random weights in one of the two FP8
checkpoint layouts (see `quantize_fp8`), so a test can load the real format through the real loader
and compare it with the unquantised model of the same seed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from common.tools.tiny_tokenizer import write_tokenizer_files

Quantization = Literal["none", "fp8-channel", "fp8-block"]
QUANTIZATIONS: tuple[str, ...] = ("none", "fp8-channel", "fp8-block")
FP8_MAX = 448.0  # largest finite float8_e4m3fn value
# The block edge the block-FP8 checkpoints use. The tiny model's matrices are smaller than one block
# in at least one dimension, so at this size most of its tensors have a single 1x1 scale; a test
# that wants several blocks per tensor passes a smaller `fp8_block`.
FP8_BLOCK = 128

TINY_CONFIG: dict[str, Any] = {
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "partial_rotary_factor": 0.5,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "rms_norm_eps": 1e-5,
    "attention_bias": True,
    "attention_dropout": 0.0,
    "use_qk_norm": True,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "tie_word_embeddings": False,
    "max_position_embeddings": 1024,
    "num_nextn_predict_layers": 1,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "use_cache": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.54.0",
}


def make_tiny_model(
    out_dir: str | Path,
    template: Literal["glm45", "glm47"] = "glm45",
    seed: int = 0,
    num_layers: int = 3,
    shards: int = 1,
    weight_dtype: torch.dtype = torch.float32,
    quantization: Quantization = "none",
    fp8_block: int = FP8_BLOCK,
    weights: bool = True,
    **overrides: Any,
) -> Path:
    """Write the model directory and return its path. `overrides` replace config.json fields.

    `weight_dtype` (default fp32) is the stored dtype of every tensor except the correction bias,
    which stays fp32 as in the real checkpoints; bf16 halves the size of large test models. With an
    FP8 `quantization` the FP8 linears are quantised from those `weight_dtype` values and every other
    tensor is stored as without quantization (the official checkpoints store them in bf16, which
    `weight_dtype=torch.bfloat16` reproduces). `fp8_block` is the block edge of "fp8-block".
    `weights=False`: config.json and the tokenizer files only (a model for `--load-format dummy`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = write_tokenizer_files(out, template)
    config = dict(TINY_CONFIG, num_hidden_layers=num_layers)
    config.update(overrides)
    vocab = max(-(-info.vocab_size // 64) * 64, config.get("vocab_size", 0))
    config.update(vocab_size=vocab, eos_token_id=info.eos_token_ids, pad_token_id=info.pad_token_id)
    if not weights:
        if quantization != "none":
            config["quantization_config"] = fp8_quantization_config(quantization, config, fp8_block)
        (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out
    tensors = random_weights(config, seed)
    if weight_dtype != torch.float32:
        tensors = {n: t if n.endswith("e_score_correction_bias") else t.to(weight_dtype) for n, t in tensors.items()}
    if quantization != "none":
        config["quantization_config"] = fp8_quantization_config(quantization, config, fp8_block)
        tensors = quantize_fp8(tensors, config, quantization, fp8_block)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _save(tensors, out, shards)
    return out


def random_weights(config: dict[str, Any], seed: int) -> dict[str, torch.Tensor]:
    """Every checkpoint tensor of the config (HF names, fp32), MTP layer included when configured."""
    gen = torch.Generator().manual_seed(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    num_layers = config["num_hidden_layers"]

    def randn(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def proj(out_f: int, in_f: int) -> torch.Tensor:
        return randn(out_f, in_f, std=in_f**-0.5)

    def norm(size: int) -> torch.Tensor:
        return 1.0 + randn(size, std=0.1)

    t: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": randn(vocab, hidden, std=1.0),
        "model.norm.weight": norm(hidden),
        "lm_head.weight": proj(vocab, hidden),
    }
    for i in range(num_layers):
        t.update(_layer(config, f"model.layers.{i}.", i >= config["first_k_dense_replace"], randn, proj, norm))
    if config.get("num_nextn_predict_layers", 0):
        p = f"model.layers.{num_layers}."
        t.update(_layer(config, p, True, randn, proj, norm))
        t[p + "enorm.weight"] = norm(hidden)
        t[p + "hnorm.weight"] = norm(hidden)
        t[p + "eh_proj.weight"] = proj(hidden, 2 * hidden)
        t[p + "shared_head.norm.weight"] = norm(hidden)
        t[p + "shared_head.head.weight"] = t["lm_head.weight"].clone()
        t[p + "embed_tokens.weight"] = t["model.embed_tokens.weight"].clone()
    return t


def _layer(config: dict[str, Any], p: str, moe: bool, randn: Any, proj: Any, norm: Any) -> dict[str, torch.Tensor]:
    hidden, head_dim = config["hidden_size"], config["head_dim"]
    q_size = config["num_attention_heads"] * head_dim
    kv_size = config["num_key_value_heads"] * head_dim
    t = {
        p + "input_layernorm.weight": norm(hidden),
        p + "post_attention_layernorm.weight": norm(hidden),
        p + "self_attn.q_proj.weight": proj(q_size, hidden),
        p + "self_attn.k_proj.weight": proj(kv_size, hidden),
        p + "self_attn.v_proj.weight": proj(kv_size, hidden),
        p + "self_attn.o_proj.weight": proj(hidden, q_size),
    }
    if config["attention_bias"]:
        for name, size in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
            t[f"{p}self_attn.{name}.bias"] = randn(size, std=0.1)
    if config["use_qk_norm"]:
        t[p + "self_attn.q_norm.weight"] = norm(head_dim)
        t[p + "self_attn.k_norm.weight"] = norm(head_dim)

    def mlp(prefix: str, width: int) -> None:
        t[prefix + "gate_proj.weight"] = proj(width, hidden)
        t[prefix + "up_proj.weight"] = proj(width, hidden)
        t[prefix + "down_proj.weight"] = proj(hidden, width)

    if not moe:
        mlp(p + "mlp.", config["intermediate_size"])
        return t
    experts, width = config["n_routed_experts"], config["moe_intermediate_size"]
    t[p + "mlp.gate.weight"] = proj(experts, hidden)
    t[p + "mlp.gate.e_score_correction_bias"] = randn(experts, std=0.05)
    for e in range(experts):
        mlp(f"{p}mlp.experts.{e}.", width)
    mlp(p + "mlp.shared_experts.", width * config["n_shared_experts"])
    return t


# ------------------------------------------------------------------------------------ FP8
# The linears the FP8 checkpoints store in FP8: attention q/k/v/o, the dense MLP, every routed and the
# shared expert, in the MTP layer too, and its eh_proj (a Linear the official ignore list does not
# name). Embeddings, lm_head and its MTP copy `shared_head.head`, the routers `mlp.gate`, norms, biases
# and the correction bias keep their unquantised dtype.
_FP8_LINEAR = re.compile(
    r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.|shared_experts\.)?(gate|up|down)_proj"
    r"|eh_proj)\.weight")


def is_fp8_linear(name: str) -> bool:
    """Whether the FP8 checkpoints store tensor `name` in float8_e4m3fn (with a scale)."""
    return _FP8_LINEAR.fullmatch(name) is not None


def fp8_quantization_config(quantization: Quantization, config: dict[str, Any], block: int) -> dict[str, Any]:
    """The `quantization_config` of config.json for `quantization` ("fp8-channel" or "fp8-block")."""
    if quantization == "fp8-block":
        return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                "weight_block_size": [block, block]}
    if quantization != "fp8-channel":
        raise ValueError(f"unknown FP8 quantization {quantization!r} (one of {QUANTIZATIONS[1:]})")
    return {
        "quant_method": "compressed-tensors",
        "format": "float-quantized",
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "kv_cache_scheme": None,
        "config_groups": {"group_0": {
            "targets": ["Linear"],
            "weights": _quant_args(strategy="channel", dynamic=False, observer="minmax"),
            "input_activations": _quant_args(strategy="token", dynamic=True, observer=None),
            "output_activations": None,
        }},
        "ignore": ["lm_head"] + [f"model.layers.{i}.mlp.gate" for i in _moe_layers(config)],
    }


def _quant_args(strategy: str, dynamic: bool, observer: str | None) -> dict[str, Any]:
    return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": strategy, "dynamic": dynamic,
            "group_size": None, "block_structure": None, "actorder": None, "observer": observer,
            "observer_kwargs": {}}


def _moe_layers(config: dict[str, Any]) -> list[int]:
    """Indices of the MoE layers, the MTP layer (stored after the main layers) included."""
    total = config["num_hidden_layers"] + config.get("num_nextn_predict_layers", 0)
    return list(range(config["first_k_dense_replace"], total))


def quantize_fp8(tensors: dict[str, torch.Tensor], config: dict[str, Any], quantization: Quantization,
                 block: int = FP8_BLOCK) -> dict[str, torch.Tensor]:
    """The checkpoint tensors with every FP8 linear replaced by float8_e4m3fn plus its fp32 scale.

    "fp8-channel": `<linear>.weight_scale` [out, 1] = row amax / 448. "fp8-block":
    `<linear>.weight_scale_inv` [ceil(out/block), ceil(in/block)] = block amax / 448. In both formats
    the scale multiplies: the dequantised weight is fp8.float() times the scale of its row or block."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if not is_fp8_linear(name):
            out[name] = t
            continue
        if quantization == "fp8-channel":
            out[name], out[name + "_scale"] = _quantize_channel(t.float())
        elif quantization == "fp8-block":
            out[name], out[name + "_scale_inv"] = _quantize_block(t.float(), block)
        else:
            raise ValueError(f"unknown FP8 quantization {quantization!r} (one of {QUANTIZATIONS[1:]})")
    return out


def _quantize_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = w.abs().amax(dim=1, keepdim=True) / FP8_MAX
    return _to_fp8(w, scale), scale


def _quantize_block(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    out_f, in_f = w.shape
    rows, cols = -(-out_f // block), -(-in_f // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:out_f, :in_f] = w.abs()
    scale = padded.reshape(rows, block, cols, block).amax(dim=(1, 3)) / FP8_MAX
    full = scale.repeat_interleave(block, 0)[:out_f].repeat_interleave(block, 1)[:, :in_f]
    return _to_fp8(w, full), scale


def _to_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w / scale rounded to float8_e4m3fn; an all-zero row or block (scale 0) stays zero."""
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (w / safe).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def _save(tensors: dict[str, torch.Tensor], out: Path, shards: int) -> None:
    names = list(tensors)
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
        return
    per = -(-len(names) // shards)
    weight_map: dict[str, str] = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s * per : (s + 1) * per]}
        save_file(part, str(out / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
