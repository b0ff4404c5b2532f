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
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from common.tools.tiny_tokenizer import write_tokenizer_files

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
    **overrides: Any,
) -> Path:
    """Write the model directory and return its path. `overrides` replace config.json fields.

    `weight_dtype` (default fp32) is the stored dtype of every tensor except the correction bias,
    which stays fp32 as in the real checkpoints; bf16 halves the size of large test models."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = write_tokenizer_files(out, template)
    config = dict(TINY_CONFIG, num_hidden_layers=num_layers)
    config.update(overrides)
    vocab = max(-(-info.vocab_size // 64) * 64, config.get("vocab_size", 0))
    config.update(vocab_size=vocab, eos_token_id=info.eos_token_ids, pad_token_id=info.pad_token_id)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tensors = random_weights(config, seed)
    if weight_dtype != torch.float32:
        tensors = {n: t if n.endswith("e_score_correction_bias") else t.to(weight_dtype) for n, t in tensors.items()}
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
