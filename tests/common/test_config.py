"""ModelConfig.from_hf on the real GLM-4.x configs (docs/model.md §1.2) and its refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from common.model.config import ConfigError, ModelConfig

COMMON: dict[str, Any] = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "hidden_act": "silu",
    "head_dim": 128, "num_attention_heads": 96, "num_key_value_heads": 8, "partial_rotary_factor": 0.5,
    "rope_theta": 1000000, "rope_scaling": None, "rms_norm_eps": 1e-05, "attention_bias": True,
    "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "vocab_size": 151552,
    "pad_token_id": 151329, "eos_token_id": [151329, 151336, 151338], "torch_dtype": "bfloat16",
    "initializer_range": 0.02, "attention_dropout": 0.0, "use_cache": True, "transformers_version": "4.54.0",
}
BIG = {"hidden_size": 5120, "num_hidden_layers": 92, "intermediate_size": 12288, "moe_intermediate_size": 1536,
       "n_routed_experts": 160, "first_k_dense_replace": 3, "routed_scaling_factor": 2.5, "use_qk_norm": True}
REAL = {
    "GLM-4.5": {**COMMON, **BIG, "max_position_embeddings": 131072},
    "GLM-4.5-Air": {**COMMON, "hidden_size": 4096, "num_hidden_layers": 46, "intermediate_size": 10944,
                    "moe_intermediate_size": 1408, "n_routed_experts": 128, "first_k_dense_replace": 1,
                    "routed_scaling_factor": 1.0, "use_qk_norm": False, "max_position_embeddings": 131072},
    "GLM-4.6": {**COMMON, **BIG, "max_position_embeddings": 202752},
    "GLM-4.7": {**COMMON, **BIG, "max_position_embeddings": 202752},
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_configs_parse(name: str, tmp_path: Path) -> None:
    raw = REAL[name]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = ModelConfig.from_hf(tmp_path)
    air = name == "GLM-4.5-Air"
    assert cfg.hidden_size == (4096 if air else 5120)
    assert cfg.num_hidden_layers == (46 if air else 92)
    assert cfg.head_dim == 128 and cfg.rotary_dim == 64
    assert cfg.q_size == 96 * 128 == 12288 and cfg.kv_size == 1024
    assert cfg.rope_theta == 1e6 and cfg.partial_rotary_factor == 0.5
    assert cfg.use_qk_norm is (not air) and cfg.attention_bias is True
    assert cfg.n_routed_experts == (128 if air else 160) and cfg.num_experts_per_tok == 8
    assert cfg.routed_scaling_factor == (1.0 if air else 2.5)
    assert (cfg.n_group, cfg.topk_group) == (1, 1)
    assert cfg.has_mtp and cfg.mtp_layer_index == (46 if air else 92)
    dense = 1 if air else 3
    assert [cfg.is_moe_layer(i) for i in range(dense + 1)] == [False] * dense + [True]
    assert cfg.is_moe_layer(cfg.mtp_layer_index)
    assert cfg.eos_token_ids == (151329, 151336, 151338) and cfg.pad_token_id == 151329
    assert cfg.max_position_embeddings == (202752 if name in ("GLM-4.6", "GLM-4.7") else 131072)
    assert cfg.quant is None


def test_fingerprint_separates_models() -> None:
    fp = {n: ModelConfig.from_dict(REAL[n]).fingerprint() for n in REAL}
    assert len({fp["GLM-4.5"], fp["GLM-4.5-Air"], fp["GLM-4.6"]}) == 3  # 4.6 differs from 4.5 in context only
    # 4.6 and 4.7 share every config field (they differ in weights and chat format, not in shapes)
    assert fp["GLM-4.6"] == fp["GLM-4.7"]
    assert ModelConfig.from_dict(dict(REAL["GLM-4.5"])).fingerprint() == fp["GLM-4.5"]


def test_v5_rope_parameters_form() -> None:
    raw = dict(REAL["GLM-4.5-Air"])
    del raw["rope_theta"], raw["partial_rotary_factor"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0, "partial_rotary_factor": 0.5}
    cfg = ModelConfig.from_dict(raw)
    assert cfg.rope_theta == 1e6 and cfg.rotary_dim == 64


def test_fp8_compressed_tensors_and_block() -> None:
    ct = {"quant_method": "compressed-tensors", "format": "float-quantized",
          "config_groups": {"group_0": {"targets": ["Linear"],
                                        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                                        "input_activations": {"num_bits": 8, "type": "float", "dynamic": True}}},
          "ignore": ["lm_head", "model.layers.1.mlp.gate"]}
    cfg = ModelConfig.from_dict({**REAL["GLM-4.5-Air"], "quantization_config": ct})
    assert cfg.quant is not None and cfg.quant.method == "compressed-tensors" and "lm_head" in cfg.quant.ignore
    block = ModelConfig.from_dict({**REAL["GLM-4.5"], "quantization_config":
                                   {"quant_method": "fp8", "weight_block_size": [128, 128]}})
    assert block.quant is not None and block.quant.weight_block_size == (128, 128) and block.quant.block == 128
    assert cfg.quant.block == 0


REFUSALS = [
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"model_type": "glm4"}, "model_type"),
    ({"hidden_size": None}, "hidden_size"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
    ({"n_group": 3}, "n_group"),
    ({"n_group": 4, "topk_group": 5}, "topk_group"),
    ({"num_key_value_heads": 7}, "num_key_value_heads"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"num_nextn_predict_layers": 2}, "num_nextn_predict_layers"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
    ({"n_group": 8, "topk_group": 1, "num_experts_per_tok": 40}, "num_experts_per_tok"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config.quant_method"),
    ({"quantization_config": {"quant_method": "fp8", "activation_scheme": "static"}},
     "quantization_config.activation_scheme"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 64]}},
     "quantization_config.weight_block_size"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                              "config_groups": {}}}, "quantization_config.format"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {}}},
     "quantization_config.config_groups"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "kv_cache_scheme": {"num_bits": 8},
                              "config_groups": {"g": {"weights": {"num_bits": 8, "type": "float",
                                                                  "strategy": "channel"}}}}},
     "quantization_config.kv_cache_scheme"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}}}},
     "quantization_config.config_groups.g.input_activations"),
    ({"quantization_config": {"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group"}}}}},
     "quantization_config.config_groups.g.weights"),
]


@pytest.mark.parametrize("change,field", REFUSALS, ids=[f for _, f in REFUSALS])
def test_refusals_name_the_field(change: dict[str, Any], field: str) -> None:
    raw = {**REAL["GLM-4.5"], **change}
    raw = {k: v for k, v in raw.items() if not (k == "hidden_size" and v is None)}
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        ModelConfig.from_dict(raw)


def test_missing_file_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_hf(tmp_path)
