"""Pure-torch twins of every custom op: they run anywhere and are the spec the Triton kernels match.

Signatures are pinned in docs/CONTRACTS.md. Numerics follow docs/model.md §2 and the cast order
of the transformers eager path (the numerics reference), so fp32 results agree to rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

# The RMSNorm statistic is exact up to one documented truncation, so that every backend gets the
# same bits whatever its reduction order (the Triton kernels on the GPU and on the interpreter, this
# twin on either device): each x^2 is scaled by a power of two chosen from the row's amax (2^e >
# amax), truncated to an integer below 2^RMS_SUM_BITS and summed in int64, where addition is
# associative; a term loses less than 2^-(RMS_SUM_BITS-2) of amax^2, so the sum is exact to
# H * 2^-44 relative, far below fp32 rounding. The tail (mean, + eps, sqrt, reciprocal) is one IEEE
# fp64 operation each, rounded once to fp32; eps is taken in fp32.
RMS_SUM_BITS = 46  # H * 2^46 < 2^63: rows up to 2^17 wide


def _fp32(v: float) -> float:
    return float(torch.tensor(v, dtype=torch.float32))


def inv_rms(xf: torch.Tensor, eps: float) -> torch.Tensor:
    """xf [..., H] fp32 -> 1 / sqrt(mean(xf^2) + eps) [..., 1] fp32, bit-reproducible (see above)."""
    amax = xf.abs().amax(dim=-1, keepdim=True)
    e = (((amax.view(torch.int32) >> 23) & 0xFF) - 126).clamp(-100, 129)  # amax < 2^e
    y = xf * ((150 - e) << 23).view(torch.float32)  # xf * 2^(23-e): |y| < 2^23, exact where |y| >= 1
    total = (y * y).long().sum(dim=-1, keepdim=True)  # terms < 2^46, truncated; exact integer sum
    unit = ((2 * e.long() - RMS_SUM_BITS + 1023) << 52).view(torch.float64)  # 2^(2e - 46)
    mean = total.double() * unit / xf.shape[-1]
    return torch.sqrt(mean + _fp32(eps)).reciprocal().float()


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x[T,H] times inv_rms in fp32, cast back to x.dtype, then scaled by w[H] in x.dtype."""
    xf = x.float()
    u = xf * inv_rms(xf, eps)
    return w.to(x.dtype) * u.to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor,  # [T,H]
    residual: torch.Tensor,  # [T,H]
    w: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual); the sum is taken in the activation dtype.
    x may be rows [T,k,H] to add up first (`combine_rows`, to residual's dtype): a fused MoE's
    per-assignment rows (`fused_moe_fp8(..., combine=False)`) or a linear's fp32 slices
    (`fp8_linear_dynamic(..., unsummed=True)`), summed as their producer would have."""
    if x.dim() == 3:
        x = combine_rows(x, residual.dtype)
    new_residual = x + residual
    return rms_norm(new_residual, w, eps), new_residual


def combine_rows(rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """rows [T,k,H] -> [T,H]: each token's k rows added in fp32 in index order to +0.0 (so an all -0.0
    column sums to +0.0), cast once to dtype (the fused MoE's last step)."""
    acc = rows.new_zeros(rows.shape[0], rows.shape[2], dtype=torch.float32)
    for j in range(rows.shape[1]):
        acc = acc + rows[:, j].float()
    return acc.to(dtype)


def _rope_neox(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """Rotate-half RoPE on the first rotary_dim dims of each head; x[T,h,D], cos/sin[T,1,rot/2]."""
    half = rotary_dim // 2
    x1 = x[..., :half]
    x2 = x[..., half:rotary_dim]
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)


def qk_norm_rope(
    q: torch.Tensor,  # [T,Hq,D]
    k: torch.Tensor,  # [T,Hk,D]
    positions: torch.Tensor,  # [T] int64
    cos_sin: torch.Tensor,  # [max_pos, rot] fp32: concat(cos, sin)
    rotary_dim: int,
    q_norm_w: torch.Tensor | None,  # [D]
    k_norm_w: torch.Tensor | None,  # [D]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm over D (when weights are given), then NeoX partial RoPE on q and k.

    cos/sin are looked up in fp32 and cast to the activation dtype before multiplying, as the
    numerics reference does.
    """
    if q_norm_w is not None:
        q = rms_norm(q, q_norm_w, eps)
    if k_norm_w is not None:
        k = rms_norm(k, k_norm_w, eps)
    half = rotary_dim // 2
    cs = cos_sin.index_select(0, positions.long())  # [T, rot]
    cos = cs[:, None, :half].to(q.dtype)  # [T,1,rot/2]
    sin = cs[:, None, half:rotary_dim].to(q.dtype)  # [T,1,rot/2]
    return _rope_neox(q, cos, sin, rotary_dim), _rope_neox(k, cos, sin, rotary_dim)


def qk_norm_rope_store(
    q: torch.Tensor,  # [T,Hq,D]
    k: torch.Tensor,  # [T,Hk,D]
    v: torch.Tensor,  # [T,Hk,D]
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    rotary_dim: int,
    q_norm_w: torch.Tensor | None,
    k_norm_w: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,  # [P,S,Hk,D]
    v_cache: torch.Tensor,  # [P,S,Hk,D]
    slots: torch.Tensor,  # [T] int64
) -> torch.Tensor:
    """qk_norm_rope, then store_kv of the normed/rotated k and of v; the new q is written over q (the
    input is consumed, as the CUDA twin rotates it in place) and returned."""
    new_q, k = qk_norm_rope(q, k, positions, cos_sin, rotary_dim, q_norm_w, k_norm_w, eps)
    store_kv(k_cache, v_cache, k, v, slots)
    return q.copy_(new_q)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T,2I] (gate columns, then up) -> silu(gate) * up [T,I], in the activation dtype."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def router_logits(x: torch.Tensor, w: torch.Tensor, partial: bool = False) -> torch.Tensor:
    """x [T,H] (any float dtype) times the fp32 router weight w [E,H]^T -> [T,E] fp32 (partial:
    as the one term [1,T,E] of a sum, the form grouped_topk also takes)."""
    out = F.linear(x.float(), w)
    return out[None] if partial else out


def grouped_topk(
    router_logits: torch.Tensor,  # [T,E] fp32, or [S,T,E] terms that sum to them
    correction_bias: torch.Tensor,  # [E] fp32
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores; bias-corrected group-limited selection; weights from the unbiased scores.

    Returns (weights[T,k+s] fp32, ids[T,k+s] int32), s = num_shared: the shared experts, stacked
    after the E routed ones, ride along as columns k.. with ids E.. and weight 1 (unscaled).
    Excluded groups are filled with -inf.
    """
    if router_logits.dim() == 3:  # the terms added in index order, as the kernel adds them
        terms = router_logits.float()
        router_logits = terms[0]
        for term in terms[1:]:
            router_logits = router_logits + term
    num_tokens, num_experts = router_logits.shape
    scores = router_logits.float().sigmoid()  # [T,E]
    choice = scores + correction_bias.float()  # [T,E], selection only
    if n_group > 1:
        grouped = choice.view(num_tokens, n_group, num_experts // n_group)
        group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)  # [T,G]
        keep = group_scores.topk(topk_group, dim=-1, sorted=False).indices  # [T,g]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(num_tokens, num_experts)
        choice = choice.masked_fill(~expert_mask, float("-inf"))
    ids = choice.topk(top_k, dim=-1, sorted=False).indices  # [T,k]
    weights = scores.gather(1, ids)  # [T,k]
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    weights = weights * scaling
    if num_shared:
        shared = torch.arange(num_experts, num_experts + num_shared, device=ids.device).expand(num_tokens, -1)
        ids = torch.cat((ids, shared), dim=1)
        weights = torch.cat((weights, weights.new_ones(num_tokens, num_shared)), dim=1)
    return weights, ids.to(torch.int32)


def fused_moe(
    x: torch.Tensor,  # [T,H]
    w13: torch.Tensor,  # [E,2I,H]: gate rows then up rows
    w2: torch.Tensor,  # [E,H,I]
    weights: torch.Tensor,  # [T,k] fp32
    ids: torch.Tensor,  # [T,k] int32
) -> torch.Tensor:
    """sum_j weights[t,j] * down_e(silu(gate_e x) * up_e x) over e = ids[t,j]; fp32 accumulation."""
    inter = w2.shape[-1]
    out = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)  # [T,H]
    flat_ids = ids.long().reshape(-1)  # [T*k]
    flat_tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(ids.shape[1])  # [T*k]
    flat_w = weights.float().reshape(-1)  # [T*k]
    for e in torch.unique(flat_ids).tolist():
        sel = (flat_ids == e).nonzero(as_tuple=True)[0]
        tok = flat_tok[sel]
        gate_up = F.linear(x[tok], w13[e])  # [n,2I]
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]  # [n,I]
        y = F.linear(act, w2[e])  # [n,H]
        out.index_add_(0, tok, y.float() * flat_w[sel, None])
    return out.to(x.dtype)


def store_kv(
    k_cache: torch.Tensor,  # [P,S,Hk,D]
    v_cache: torch.Tensor,  # [P,S,Hk,D]
    k: torch.Tensor,  # [T,Hk,D]
    v: torch.Tensor,  # [T,Hk,D]
    slots: torch.Tensor,  # [T] int64 physical flat slots (page * S + offset)
) -> None:
    """Write each token's K/V to its flat slot, in place."""
    num_heads, head_dim = k_cache.shape[-2:]
    k_cache.view(-1, num_heads, head_dim).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, num_heads, head_dim).index_copy_(0, slots, v.to(v_cache.dtype))


# FP8 (E4M3, "fn": no infinities, largest finite 448). Scales are fp32 and multiply back:
# x ~= q.float() * scale. The amax floor only guards all-zero rows (a finite, nonzero scale and
# zero codes); it sits far below the amax of any real activation row, so it never coarsens one.
FP8_MAX = 448.0
FP8_AMAX_FLOOR = 2.0**-30


def _quant_fp8_last_dim(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise x[..., n] with one scale per leading index: (q[..., n] e4m3, scale[..., 1] fp32)."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True).clamp_min(FP8_AMAX_FLOOR)
    # divide by a tensor, not a Python number: CUDA divides by a scalar as a multiply by its rounded
    # reciprocal, which is not IEEE division and would make this twin differ between devices
    scale = amax / torch.full_like(amax, FP8_MAX)
    q = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)  # round to nearest even
    return q, scale


def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x[T,K] -> (q[T,K] e4m3, scale[T,1] fp32): scale = max(amax_k |x|, floor) / 448, q = x / scale."""
    return _quant_fp8_last_dim(x)


def quant_fp8_per_group(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x[T,K] -> (q[T,K] e4m3, scale[T,K/group] fp32): per_token on each run of `group` columns."""
    num_tokens, k = x.shape
    if k % group:
        raise ValueError(f"quant_fp8_per_group: K={k} is not a multiple of group={group}")
    q, scale = _quant_fp8_last_dim(x.reshape(num_tokens, k // group, group))
    return q.reshape(num_tokens, k), scale.squeeze(-1)


def fp8_linear(
    x_q: torch.Tensor,  # [T,K] e4m3
    x_scale: torch.Tensor,  # [T,1] fp32
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # [N,1] fp32
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """y[T,N] = (x_q * x_scale) @ (w_q * w_scale)^T (+ bias): both operands dequantised, fp32 matmul."""
    y = (x_q.float() * x_scale) @ (w_q.float() * w_scale).T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fp8_moe_scale_shapes(num_experts: int, inter: int, hidden: int, block: int) -> tuple[tuple, tuple]:
    """(s13 shape, s2 shape) of fused_moe_fp8: one scale per output row (block 0, the official GLM
    FP8 "channel" format) or one per block x block weight tile (block FP8's weight_scale_inv)."""
    if block == 0:
        return (num_experts, 2 * inter, 1), (num_experts, hidden, 1)
    return (num_experts, 2 * inter // block, hidden // block), (num_experts, hidden // block, inter // block)


def check_fused_moe_fp8(
    x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
    weights: torch.Tensor, ids: torch.Tensor, block: int,
) -> None:
    """Raise ValueError, naming the argument, unless the operands fit fused_moe_fp8's contract."""
    def bad(msg: str) -> ValueError:
        return ValueError(f"fused_moe_fp8: {msg}")

    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise bad(f"x must be [T,H] bf16, fp16 or fp32; got {tuple(x.shape)} {x.dtype}")
    n_tok, hidden = x.shape
    if w13.dim() != 3 or w13.dtype != torch.float8_e4m3fn or w13.shape[2] != hidden or w13.shape[1] % 2:
        raise bad(f"w13 must be [E,2I,H={hidden}] float8_e4m3fn; got {tuple(w13.shape)} {w13.dtype}")
    num_experts, inter = w13.shape[0], w13.shape[1] // 2
    if w2.dtype != torch.float8_e4m3fn or tuple(w2.shape) != (num_experts, hidden, inter):
        raise bad(f"w2 must be [E={num_experts},H={hidden},I={inter}] float8_e4m3fn; got {tuple(w2.shape)} {w2.dtype}")
    if block < 0 or (block and (hidden % block or inter % block)):
        raise bad(f"block={block} must be 0 (per-channel scales) or divide H={hidden} and I={inter}")
    want13, want2 = fp8_moe_scale_shapes(num_experts, inter, hidden, block)
    for name, s, want in (("s13", s13, want13), ("s2", s2, want2)):
        if s.dtype != torch.float32 or tuple(s.shape) != want:
            raise bad(f"{name} must be {list(want)} float32 for block={block}; got {tuple(s.shape)} {s.dtype}")
    if weights.dim() != 2 or weights.shape[0] != n_tok or not weights.is_floating_point():
        raise bad(f"weights must be [T={n_tok},k] float; got {tuple(weights.shape)} {weights.dtype}")
    if tuple(ids.shape) != tuple(weights.shape) or ids.dtype not in (torch.int32, torch.int64):
        raise bad(f"ids must be [T,k]={tuple(weights.shape)} int32 or int64; got {tuple(ids.shape)} {ids.dtype}")


def _dequant_rows(q: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """q[R,K] e4m3 with scale[R,1] (block 0) or [R,K/block] -> fp32 [R,K]."""
    return q.float() * (scale.repeat_interleave(block, dim=1) if block else scale)


def _dequant_weight(w: torch.Tensor, scale: torch.Tensor, block: int) -> torch.Tensor:
    """w[N,K] e4m3 with scale[N,1] (block 0) or [N/block, K/block] -> fp32 [N,K]."""
    if block:
        scale = scale.repeat_interleave(block, dim=0).repeat_interleave(block, dim=1)
    return w.float() * scale


def fused_moe_fp8(
    x: torch.Tensor,  # [T,H] bf16 | fp16 | fp32
    w13: torch.Tensor,  # [E,2I,H] e4m3: gate rows then up rows
    s13: torch.Tensor,  # fp32 [E,2I,1] (block 0) | [E,2I/b,H/b]
    w2: torch.Tensor,  # [E,H,I] e4m3
    s2: torch.Tensor,  # fp32 [E,H,1] (block 0) | [E,H/b,I/b]
    weights: torch.Tensor,  # [T,k] fp32
    ids: torch.Tensor,  # [T,k] int32
    block: int = 0,
    x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,  # step 1 already done by x's producer
    num_shared: int = 0,  # a scheduling hint of the GPU kernels; the result does not depend on it
    combine: bool = True,  # False: step 6 left to the consumer, rows [T,k,H] returned
) -> torch.Tensor:  # [T,H] x.dtype
    """The W8A8 fused MoE: sum_j weights[t,j] * down_e(silu(gate_e x) * up_e x), e = ids[t,j], with
    FP8 weights and activations. Exactly (block 0: per token / per row; block b: per 1 x b group
    along K, weight scales per b x b tile, so w13 row n has scale row n // b):
    1. x_q, s_x = quant_fp8_per_token(x) | quant_fp8_per_group(x, b): once per token row.
    2. per assignment: gate_up = deq(x_q) @ deq(w13[e])^T in fp32 (dequantised operands).
    3. h = silu(gate) * up in fp32, then rounded to x.dtype (the intermediate's storage dtype).
    4. h_q, s_h = the same quantiser over the assignment row's I columns (per row | per group).
    5. y = deq(h_q) @ deq(w2[e])^T in fp32, times the routing weight (fp32), rounded to x.dtype (the
       per-assignment rows' storage dtype).
    6. out[t] = sum_j y[t,j] in fp32 in index order, cast once to x.dtype (`combine_rows`). With
       combine=False the rows y [T,k,H] are returned instead, for a consumer that sums them itself
       (fused_add_rms_norm and its FP8 form take them as x).
    `x_quant` = (x_q, s_x) of step 1 when the producer of x quantised it already (a norm fused with the
    quantiser, bit-equal to step 1); x then only gives the shape and dtype.
    Loops over the experts present, not the tokens, so it serves a whole model on the CPU."""
    check_fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block)
    inter = w2.shape[-1]
    rows = torch.zeros(ids.numel(), x.shape[1], dtype=x.dtype, device=x.device)  # [T*k,H]
    if x.shape[0] == 0:
        return rows.view(0, ids.shape[1], x.shape[1]) if not combine else x.new_zeros(x.shape)

    def quant(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quant_fp8_per_group(v, block) if block else quant_fp8_per_token(v)

    x_deq = _dequant_rows(*(x_quant or quant(x)), block)  # [T,H] fp32
    flat_ids = ids.long().reshape(-1)  # [T*k]
    flat_tok = torch.arange(x.shape[0], device=x.device).repeat_interleave(ids.shape[1])  # [T*k]
    flat_w = weights.float().reshape(-1)  # [T*k]
    for e in torch.unique(flat_ids).tolist():
        sel = (flat_ids == e).nonzero(as_tuple=True)[0]
        tok = flat_tok[sel]
        gate_up = x_deq[tok] @ _dequant_weight(w13[e], s13[e], block).T  # [n,2I] fp32
        h = (F.silu(gate_up[:, :inter]) * gate_up[:, inter:]).to(x.dtype)  # [n,I]
        y = _dequant_rows(*quant(h), block) @ _dequant_weight(w2[e], s2[e], block).T  # [n,H] fp32
        rows[sel] = (y * flat_w[sel, None]).to(x.dtype)
    rows = rows.view(x.shape[0], ids.shape[1], x.shape[1])
    return combine_rows(rows, x.dtype) if combine else rows


class Routing(NamedTuple):
    """How a MoE picks each token's experts from its router logits: grouped_topk's arguments after them."""

    correction_bias: torch.Tensor  # [E] fp32
    top_k: int
    n_group: int
    topk_group: int
    renormalize: bool
    scaling: float
    num_shared: int = 0


def routed_moe_fp8(
    x: torch.Tensor,  # [T,H] bf16 | fp16 | fp32
    router_logits: torch.Tensor,  # [T,E] fp32, or [S,T,E] terms that sum to them
    routing: Routing,
    w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,  # as fused_moe_fp8's
    block: int = 0,
    x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,
    combine: bool = True,
) -> torch.Tensor:
    """grouped_topk(router_logits, *routing), then fused_moe_fp8 on its weights and ids: the FP8 MoE block
    from the router's logits on (the GPU twin may route inside the fused MoE, one launch fewer)."""
    weights, ids = grouped_topk(router_logits, *routing)
    return fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block, x_quant, routing.num_shared, combine)


def quant_fp8_weight_blocks(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """w[N,K] -> (q[N,K] e4m3, scale[ceil(N/b), K/b] fp32): per_token on each b x b block, the layout
    of block-FP8 checkpoints (`weight_scale_inv`); N may end in a partial block, K may not."""
    n_out, k = w.shape
    if k % block:
        raise ValueError(f"quant_fp8_weight_blocks: K={k} is not a multiple of block={block}")
    rows = -(-n_out // block)
    padded = torch.zeros(rows * block, k, dtype=w.dtype, device=w.device)
    padded[:n_out] = w
    blocks = padded.view(rows, block, k // block, block).transpose(1, 2)  # [N/b, K/b, b, b]
    q, scale = _quant_fp8_last_dim(blocks.reshape(rows, k // block, block * block))
    q = q.view(rows, k // block, block, block).transpose(1, 2).reshape(rows * block, k)[:n_out]
    return q, scale.squeeze(-1)


# Producers fused with the quantiser. Each quantises the activation exactly as the unfused pair
# would: the producer's output rounded to its dtype (bf16 in serving), then quant_fp8_per_token
# (group 0) or quant_fp8_per_group; so the unfused ops are a bit-equal fallback.
def _quant_fp8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    return quant_fp8_per_token(x) if group == 0 else quant_fp8_per_group(x, group)


def rms_norm_quant_fp8(
    x: torch.Tensor,  # [T,H]
    w: torch.Tensor,  # [H]
    eps: float,
    group: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q[T,H] e4m3, scale[T,1] or [T,H/group] fp32) of rms_norm(x, w, eps) as rounded to x.dtype."""
    return _quant_fp8(rms_norm(x, w, eps), group)


def fused_add_rms_norm_quant_fp8(
    x: torch.Tensor,  # [T,H]
    residual: torch.Tensor,  # [T,H]
    w: torch.Tensor,  # [H]
    eps: float,
    group: int = 0,
    keep_normed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, scale, x + residual, normed or None): fused_add_rms_norm, then the normed value (in the
    activation dtype; returned too when keep_normed, for a consumer that wants it unquantised) quantised."""
    normed, new_residual = fused_add_rms_norm(x, residual, w, eps)
    q, scale = _quant_fp8(normed, group)
    return q, scale, new_residual, normed if keep_normed else None


def silu_and_mul_quant_fp8(gate_up: torch.Tensor, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [T,2I] -> (q[T,I] e4m3, scale[T,1] or [T,I/group] fp32) of silu_and_mul(gate_up)."""
    return _quant_fp8(silu_and_mul(gate_up), group)


def fp8_block_linear(
    x_q: torch.Tensor,  # [T,K] e4m3
    x_scale: torch.Tensor,  # [T,K/b] fp32
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # [ceil(N/b), K/b] fp32
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
) -> torch.Tensor:
    """y[T,N] for 1 x b activation groups and b x b weight blocks: both dequantised, fp32 matmul.
    K must be a multiple of b (whole activation groups); N may end in a partial block."""
    n_out, k = w_q.shape
    if k % block:
        raise ValueError(f"fp8_block_linear: K={k} is not a multiple of block={block}")
    x = x_q.float() * x_scale.repeat_interleave(block, dim=1)  # [T,K]
    w = w_q.float() * w_scale.repeat_interleave(block, dim=0)[:n_out].repeat_interleave(block, dim=1)  # [N,K]
    y = x @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)


def fp8_linear_dynamic(
    x: torch.Tensor,  # [T,K] bf16 | fp16 | fp32
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # block 0: [N,1]; b: [ceil(N/b), K/b] fp32
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 0,
    unsummed: bool = False,
    x_amax: torch.Tensor | None = None,  # [T,G] fp32: max |x| over G parts of each row (a hint)
) -> torch.Tensor:
    """The W8A8 linear of an unquantised x: x quantised per token (block 0) or per 1 x b group, then
    `fp8_linear` / `fp8_block_linear` (the GPU twin may quantise inside the GEMM: the same codes).
    unsummed (no bias): the result may come as fp32 partial products [T,S,N] whose `combine_rows` to
    out_dtype is the [T,N] result, for the next fused_add_rms_norm to add up (here S = 1: the fp32
    product itself; the GPU twin hands over its split-K slices). x_amax, from x's producer: the max
    over its G columns of each row is the row's max |x| (x as given), which the GPU twin's in-GEMM
    quantiser takes instead of reading the row again; the result does not depend on it."""
    x_q, x_scale = quant_fp8_per_token(x) if block == 0 else quant_fp8_per_group(x, block)
    rows = unsummed and bias is None
    dtype = torch.float32 if rows else out_dtype
    y = (fp8_linear(x_q, x_scale, w_q, w_scale, bias, dtype) if block == 0
         else fp8_block_linear(x_q, x_scale, w_q, w_scale, bias, dtype, block))
    return y[:, None] if rows else y


def apply_token_bitmask(
    logits: torch.Tensor,  # [R,V] float, modified in place
    bitmask: torch.Tensor,  # [R,ceil(V/32)] int32: bit (id % 32) of word id // 32 = 1 keeps token id
) -> torch.Tensor:
    """Structured output: every logit whose bit is 0 becomes -inf (in place); returns `logits`."""
    rows, vocab = logits.shape
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    keep = ((bitmask.to(torch.int32)[:, :, None] >> shifts) & 1).reshape(rows, -1)[:, :vocab]  # [R,V]
    return logits.masked_fill_(keep.to(logits.device) == 0, float("-inf"))
