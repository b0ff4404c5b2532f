"""The MoE block of GLM-4 MoE (spec §2.6): sigmoid router with a selection-only correction bias,
group-limited top-k, routed experts scaled by s, and an unscaled shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common import ops
from common.config import ModelConfig
from common.model.layers import GatedMLP


class Router(nn.Module):
    """Router logits in fp32: weight [E,H] and the correction bias [E] are kept in fp32."""

    fp32_params = ("weight", "e_score_correction_bias")  # whatever the model dtype

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32),
                                   requires_grad=False)  # [E,H]
        self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts, dtype=torch.float32),
                                                    requires_grad=False)  # [E]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.float(), self.weight.float())  # [T,E] fp32


class Experts(nn.Module):
    """Routed experts stacked: w13 [E,2I,H] (gate rows, then up rows), w2 [E,H,I] (down)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def rows(self, part: str) -> slice:
        """Rows of w13 that hold `gate_proj` or `up_proj` (the loader writes there)."""
        i = self.intermediate_size
        return {"gate_proj": slice(0, i), "up_proj": slice(i, 2 * i)}[part]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return ops.fused_moe(x, self.w13, self.w2, weights, ids)  # [T,H]


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.renormalize = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.gate = Router(config.hidden_size, config.n_routed_experts)
        self.experts = Experts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = GatedMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x [T,H]
        logits = self.gate(x)  # [T,E] fp32
        weights, ids = ops.grouped_topk(logits, self.gate.e_score_correction_bias, self.top_k,
                                        self.n_group, self.topk_group, self.renormalize, self.scaling)
        routed = self.experts(x, weights, ids)  # [T,H], already scaled by s
        return routed + self.shared_experts(x)  # the shared expert is not scaled
