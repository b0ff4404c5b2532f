"""The 4-layer GLM-4.5-Air-shaped model the step benchmarks run: Air's widths (H 4096, 96/8 heads of
128, 128 experts top-8 of I_e 1408, dense I 10944, vocab 151552), 1 dense + 3 MoE layers and the MTP
layer, random weights (norms 1, biases N(0, 0.02), projections N(0, 1/fan_in))."""

from __future__ import annotations

import torch

from common.model import build_model
from common.model.config import ModelConfig

AIR = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 96,
    "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.5, "rope_theta": 1e6,
    "rms_norm_eps": 1e-5, "attention_bias": True, "use_qk_norm": False, "n_routed_experts": 128,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.0, "norm_topk_prob": True, "max_position_embeddings": 16384,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
}
TINY_WIDTHS = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
               "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 32, "n_routed_experts": 16}


def random_model(fields: dict, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """build_model(fields) with the MTP layer and seeded random weights."""
    config = ModelConfig.from_dict(fields)
    model = build_model(config, device, dtype, with_mtp=True)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm" in name.split(".")[-2]:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, (1.0 / p.shape[-1]) ** 0.5, generator=gen)
    return model
