"""The MoE block of GLM-4 MoE (docs/model.md §2.6): sigmoid router with a selection-only correction bias,
group-limited top-k, routed experts scaled by s, and an unscaled shared expert.

The shared expert runs inside the fused MoE: its weights are stacked after the E routed experts
(a shared MLP of width n*I is n experts of width I: gate/up rows and down columns split in n),
and every token's top-k gets n more columns with ids E.. and weight 1. One grouped GEMM pass then
covers routed and shared, with a single fp32 combine (no separate GEMMs, SiLU, multiply and add).

Under tensor parallelism (common/model/layers.py) every rank holds all E+n experts with its block of
each expert's intermediate width (gate/up rows, down columns) and one all-reduce after the combine
sums routed and shared partials; the router is replicated (its fp32 inputs are the same bits on
every rank, so every rank picks the same experts).
"""

from __future__ import annotations

import torch
from torch import nn

from common import ops
from common.model.config import ModelConfig
from common.model.layers import (
    FP8_DTYPE,
    WHOLE,
    Fp8Activation,
    Shard,
    current_tp,
    cut_blocks,
    fp8_scale_shape,
    shard_range,
)
from common.ops.reference import Routing

# The FP8 MoE of a single-rank model hands the next norm its per-assignment rows [T,k,H] instead of
# their sum: the norm adds them as it loads them (the same fp32 sum), so no combine runs between the
# two. False: the MoE combines them itself (one more launch a layer), for timing the two.
COMBINE_IN_NORM = True


class Router(nn.Module):
    """Router logits in fp32: weight [E,H] and the correction bias [E] are kept in fp32."""

    fp32_params = ("weight", "e_score_correction_bias")  # whatever the model dtype

    def __init__(self, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32),
                                   requires_grad=False)  # [E,H]
        self.e_score_correction_bias = nn.Parameter(torch.empty(num_experts, dtype=torch.float32),
                                                    requires_grad=False)  # [E]

    def forward(self, x: torch.Tensor, partial: bool = False) -> torch.Tensor:
        """[T,E] fp32 logits; partial: [S,T,E] terms summing to them, for grouped_topk to add."""
        return ops.router_logits(x, self.weight, partial)


class Experts(nn.Module):
    """Experts stacked: w13 [E,2I,H] (gate rows, then up rows), w2 [E,H,I] (down); the routed ones
    first, then the shared ones. I is this rank's block of the expert width (moe_intermediate_size / tp).

    After `use_fp8(block)` both stacks are float8_e4m3fn with fp32 scales that multiply back:
    block 0 (per output channel) `w13_scale` [E,2I,1], `w2_scale` [E,H,1]; block b (per b x b block)
    `w13_scale` [E,2I/b,H/b], `w2_scale` [E,H/b,I/b]. The fused MoE then runs W8A8.
    """

    fp8_block: int | None = None

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, num_shared: int = 0) -> None:
        super().__init__()
        self.num_shared = num_shared  # the last experts: fused shared experts, in every token's ids
        self.tp = current_tp()
        self.source = shard_range(intermediate_size, self.tp, "moe_intermediate_size")
        self.full_intermediate = intermediate_size
        intermediate_size = self.source.stop - self.source.start
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size), requires_grad=False)

    def rows(self, part: str) -> slice:
        """Rows of w13 that hold `gate_proj` or `up_proj` (the loader writes there)."""
        i = self.intermediate_size
        return {"gate_proj": slice(0, i), "up_proj": slice(i, 2 * i)}[part]

    def shard(self, part: str | None = None) -> Shard | None:
        """What this rank holds of one expert's checkpoint `part` (gate_proj, up_proj [I,H]: rows;
        down_proj [H,I]: columns); None when unsharded."""
        if self.tp.size == 1:
            return None
        i, h = self.full_intermediate, self.hidden_size
        return Shard((WHOLE, self.source), (h, i)) if part == "down_proj" else Shard((self.source, WHOLE), (i, h))

    def splits_fp8_blocks(self, block: int) -> str | None:
        if self.hidden_size % block:
            return None
        return cut_blocks("moe_intermediate_size", self.full_intermediate, self.source.start,
                          self.intermediate_size, block)

    def fp8_blocks_fit(self, block: int) -> bool:
        """Whether gate, up and down fall on whole b x b blocks (block FP8 computable)."""
        return self.intermediate_size % block == 0 and self.hidden_size % block == 0

    def use_fp8(self, block: int) -> None:
        """Hold both stacks in FP8 with their scales (fresh uninitialised storage on their device)."""
        e, h, i, device = self.num_experts, self.hidden_size, self.intermediate_size, self.w13.device

        def param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
            return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)

        self.w13, self.w2 = param(e, 2 * i, h, dtype=FP8_DTYPE), param(e, h, i, dtype=FP8_DTYPE)
        self.w13_scale = param(e, *fp8_scale_shape(2 * i, h, block), dtype=torch.float32)
        self.w2_scale = param(e, *fp8_scale_shape(h, i, block), dtype=torch.float32)
        self.fp8_block = block

    def scale_rows(self, rows: slice) -> slice:
        """The rows of `w13_scale` that scale w13 rows `rows`."""
        if not self.fp8_block:
            return rows
        return slice(rows.start // self.fp8_block, -(-rows.stop // self.fp8_block))

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                x_quant: tuple[torch.Tensor, torch.Tensor] | None = None, combine: bool = True) -> torch.Tensor:
        """[T,H]; combine=False may return the FP8 MoE's rows [T,k,H] unsummed (one rank only: the
        all-reduce needs the sum), for a fused_add_rms_norm to sum."""
        if self.fp8_block is None:
            y = ops.fused_moe(x, self.w13, self.w2, weights, ids)  # [T,H]
        else:
            y = ops.fused_moe_fp8(x, self.w13, self.w13_scale, self.w2, self.w2_scale, weights, ids, self.fp8_block,
                                  x_quant, self.num_shared, combine or self.tp.size > 1)
        return y if self.tp.size == 1 else self.tp.all_reduce(y)  # routed + shared partials summed

    def forward_routed(self, x: torch.Tensor, logits: torch.Tensor, routing: Routing,
                       x_quant: tuple[torch.Tensor, torch.Tensor] | None = None, combine: bool = True) -> torch.Tensor:
        """FP8 experts from the router's logits on (`ops.routed_moe_fp8`: the GPU routes one token inside
        the fused MoE); as forward otherwise."""
        y = ops.routed_moe_fp8(x, logits, routing, self.w13, self.w13_scale, self.w2, self.w2_scale, self.fp8_block,
                               x_quant, combine or self.tp.size > 1)
        return y if self.tp.size == 1 else self.tp.all_reduce(y)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.renormalize = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.gate = Router(config.hidden_size, config.n_routed_experts)
        self.num_shared = config.n_shared_experts
        self.experts = Experts(config.n_routed_experts + self.num_shared, config.hidden_size,
                               config.moe_intermediate_size, self.num_shared)

    input_needs_normed = True  # the router reads x in the model dtype, the FP8 experts its quantisation

    @property
    def input_fp8_block(self) -> int | None:
        """What the producer of x should quantise for (None: nothing)."""
        return self.experts.fp8_block

    def forward(self, x: torch.Tensor | Fp8Activation, combine: bool = True) -> torch.Tensor:
        # x [T,H], or quantised for the FP8 experts with the unquantised value in x.normed; -> [T,H], or
        # with combine=False possibly the rows [T,k,H] (Experts.forward)
        x_quant = None
        if isinstance(x, Fp8Activation):
            x, x_quant = x.normed, (x.q, x.scale)
        logits = self.gate(x, partial=True)  # [S,T,E] fp32 terms: top-k adds them as it loads them
        routing = Routing(self.gate.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                          self.renormalize, self.scaling, self.num_shared)
        if self.experts.fp8_block is not None:
            return self.experts.forward_routed(x, logits, routing, x_quant, combine)
        weights, ids = ops.grouped_topk(logits, *routing)
        return self.experts(x, weights, ids, x_quant, combine)  # routed (scaled by s) + shared (weight 1)
