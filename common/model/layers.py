"""Building blocks of the GLM-4 MoE model: norms, linears, RoPE table, gated MLP, paged attention.

Modules are built on the meta device and given their dtype by `cast_parameters`; the loader then
materialises them tensor by tensor on the target device. Single-device for now:
tensor-parallel sharding, when it comes, lives here and only here.

FP8: a `Linear` (and the MoE `Experts`, common/model/moe.py) switched by `use_fp8(block)` holds its
weight in float8_e4m3fn with fp32 scales that multiply back — `weight_scale` [out,1] per output
channel (block 0) or [ceil(out/b), ceil(in/b)] per b x b block — and quantises its input
dynamically, per token (block 0) or per 1 x b group, before the FP8 GEMM. A producer that already
quantised the input (a norm fused with the quantiser) passes an `Fp8Activation` instead.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from common import ops
from common.attention import paged_attention
from common.forward.context import get_forward_context


def cast_parameters(model: nn.Module, dtype: torch.dtype) -> None:
    """Give every floating parameter `dtype`, except those a module lists in `fp32_params`
    (the router's), which stay fp32. Meant for a model on the meta device (no data moves)."""
    for module in model.modules():
        keep = getattr(module, "fp32_params", ())
        for name, param in list(module.named_parameters(recurse=False)):
            want = torch.float32 if name in keep else dtype
            if param.is_floating_point() and param.dtype != want:
                setattr(module, name, nn.Parameter(param.to(want), requires_grad=False))


FP8_DTYPE = torch.float8_e4m3fn


class Fp8Activation(NamedTuple):
    """An activation already quantised for an FP8 linear: q [T,K] e4m3 and its fp32 scales
    ([T,1] per token, or [T,K/b] per 1 x b group); `dtype` is the dtype the linear returns;
    `normed` the value itself in that dtype when a consumer needs both (the MoE's router)."""

    q: torch.Tensor
    scale: torch.Tensor
    dtype: torch.dtype
    normed: torch.Tensor | None = None


def fp8_scale_shape(rows: int, cols: int, block: int) -> tuple[int, int]:
    """Shape of the fp32 scales of an FP8 [rows, cols] weight: per row (block 0) or per b x b block."""
    return (rows, 1) if block == 0 else (-(-rows // block), -(-cols // block))


def quantize_activation(x: torch.Tensor, block: int) -> Fp8Activation:
    """Dynamic FP8 quantisation of x [T,K]: one scale per token (block 0) or per 1 x block group."""
    q, scale = ops.quant_fp8_per_token(x) if block == 0 else ops.quant_fp8_per_group(x, block)
    return Fp8Activation(q, scale, x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(size), requires_grad=False)  # [size]
        self.eps = eps

    def forward(self, x: torch.Tensor, quant: int | None = None) -> torch.Tensor | Fp8Activation:
        """norm(x); with `quant` (the FP8 block of the consuming linear, 0 = per token) the norm's output
        comes quantised for that linear, in the same kernel."""
        if quant is None:
            return ops.rms_norm(x, self.weight, self.eps)
        q, scale = ops.rms_norm_quant_fp8(x, self.weight, self.eps, quant)
        return Fp8Activation(q, scale, x.dtype)

    def add_and_norm(self, x: torch.Tensor, residual: torch.Tensor, quant: int | None = None,
                     keep_normed: bool = False) -> tuple[torch.Tensor | Fp8Activation, torch.Tensor]:
        """(norm(x + residual), x + residual); the norm quantised for its consumer as in `forward`,
        with the unquantised norm kept alongside when `keep_normed`."""
        if quant is None:
            return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        q, scale, residual, normed = ops.fused_add_rms_norm_quant_fp8(x, residual, self.weight, self.eps, quant,
                                                                     keep_normed)
        return Fp8Activation(q, scale, x.dtype, normed), residual


class Embedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim), requires_grad=False)  # [V,H]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)  # [T,H]


class Linear(nn.Linear):
    """y = x W^T (+ b), W [out, in]; inference-only parameters. After `use_fp8`, an FP8 W8A8 linear."""

    fp8_block: int | None = None  # None: high precision; 0: FP8 per output channel; b: FP8 per b x b block

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)

    def reset_parameters(self) -> None:  # weights come from the checkpoint
        pass

    def use_fp8(self, block: int) -> None:
        """Hold W in FP8 with its scales (fresh uninitialised storage on W's device; meta before loading)."""
        device = self.weight.device
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, dtype=FP8_DTYPE, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(
            torch.empty(fp8_scale_shape(self.out_features, self.in_features, block), dtype=torch.float32,
                        device=device), requires_grad=False)
        self.fp8_block = block

    def fp8_blocks_fit(self, block: int) -> bool:
        """Whether block FP8 is computable: the input width falls on whole blocks (activation groups)."""
        return self.in_features % block == 0

    def scale_rows(self, rows: slice) -> slice:
        """The rows of `weight_scale` that scale weight rows `rows` (whole blocks when block FP8)."""
        if not self.fp8_block:
            return rows
        b = self.fp8_block
        return slice(rows.start // b, -(-rows.stop // b))

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        if self.fp8_block is None:
            return F.linear(x, self.weight, self.bias)
        if not isinstance(x, Fp8Activation):
            lead = x.shape[:-1]
            return self.forward(quantize_activation(x.reshape(-1, x.shape[-1]), self.fp8_block)).view(*lead, -1)
        if self.fp8_block == 0:
            return ops.fp8_linear(x.q, x.scale, self.weight, self.weight_scale, self.bias, x.dtype)
        return ops.fp8_block_linear(x.q, x.scale, self.weight, self.weight_scale, self.bias, x.dtype,
                                    self.fp8_block)


class MergedLinear(Linear):
    """Several linears on the same input stacked along the output dim (e.g. q|k|v, gate|up).

    `parts` maps a part name to its output width, in row order; `rows(part)` is its row slice,
    which is where the loader writes that part's checkpoint tensor.
    """

    def __init__(self, in_features: int, parts: dict[str, int], bias: bool) -> None:
        super().__init__(in_features, sum(parts.values()), bias)
        self.parts = dict(parts)

    def rows(self, part: str) -> slice:
        start = 0
        for name, width in self.parts.items():
            if name == part:
                return slice(start, start + width)
            start += width
        raise KeyError(f"{part!r} is not a part of this merged linear ({list(self.parts)})")

    def fp8_blocks_fit(self, block: int) -> bool:
        """Whether every part and the input width fall on whole b x b blocks (block FP8 computable)."""
        return self.in_features % block == 0 and all(w % block == 0 for w in self.parts.values())

    def forward_parts(self, x: torch.Tensor | Fp8Activation) -> tuple[torch.Tensor, ...]:
        return tuple(self(x).split(list(self.parts.values()), dim=-1))


class GatedMLP(nn.Module):
    """down(silu(gate x) * up x); the dense MLP of the first layers."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, {"gate_proj": intermediate_size,
                                                       "up_proj": intermediate_size}, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    input_needs_normed = False

    @property
    def input_fp8_block(self) -> int | None:
        """What the producer of this MLP's input should quantise for (None: nothing)."""
        return self.gate_up_proj.fp8_block

    def forward(self, x: torch.Tensor | Fp8Activation) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [T,2I]
        block = self.down_proj.fp8_block
        if block is None:
            return self.down_proj(ops.silu_and_mul(gate_up))  # [T,I] -> [T,H]
        q, scale = ops.silu_and_mul_quant_fp8(gate_up, block)  # SiLU·mul quantised for down in one kernel
        return self.down_proj(Fp8Activation(q, scale, gate_up.dtype))


@functools.lru_cache(maxsize=8)
def rope_cos_sin(rotary_dim: int, theta: float, max_positions: int, device: torch.device) -> torch.Tensor:
    """[max_positions, rotary_dim] fp32 table: row p = concat(cos(p * inv_freq), sin(p * inv_freq)),
    inv_freq_j = theta^(-2j / rotary_dim). Shared by every layer on a device."""
    # computed on the CPU so that every device sees bit-identical values
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim
    inv_freq = 1.0 / (theta**exponent)  # [rot/2]
    angles = torch.arange(max_positions, dtype=torch.int64).float()[:, None] * inv_freq[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=-1).to(device)


class PagedAttention(nn.Module):
    """Per-head QK-norm and partial RoPE, this layer's new K/V into the pool (one fused op), then
    attention over the batch's paged KV.

    The batch description and pool come from the forward context; `layer_id` selects the pool
    layer (the MTP layer uses index num_hidden_layers).
    """

    def __init__(self, layer_id: int, scale: float) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.scale = scale

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                cos_sin: torch.Tensor, rotary_dim: int, q_norm_w: torch.Tensor | None, k_norm_w: torch.Tensor | None,
                eps: float) -> torch.Tensor:
        # q [T,Hq,D], k/v [T,Hk,D] before norm and RoPE -> [T,Hq,D]
        ctx = get_forward_context()
        k_cache, v_cache = ctx.kv_pool.k[self.layer_id], ctx.kv_pool.v[self.layer_id]
        q = ops.qk_norm_rope_store(q, k, v, positions, cos_sin, rotary_dim, q_norm_w, k_norm_w, eps,
                                   k_cache, v_cache, ctx.batch.out_slots)
        return paged_attention(q, k_cache, v_cache, ctx.batch, self.scale)
