"""Triton twins of `reference.quant_fp8_per_token` and `reference.quant_fp8_per_group`.

Bit-equal to the twins (codes and scales): the math is fp32 with IEEE division (`div_rn`), and the
round to E4M3 is done in fp32 by `_round_e4m3` before a cast that is then exact. That keeps the
result independent of how a backend converts fp32 to fp8 (the CPU interpreter's conversion drops
the carry into the next binade, e.g. 31.99 -> 16); on sm_90 the hardware conversion would give the
same codes. Rows must have a contiguous last dim (others are copied first); loads along it are
contiguous, so they vectorise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.ops.reference import FP8_AMAX_FLOOR, FP8_MAX

_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (r + M) - M rounds |r| < 2^22 to an integer, ties to even


@triton.jit
def _round_e4m3(v):
    """fp32 v (|v| <= 448) rounded to the nearest E4M3 value, ties to even; the sign of zero kept."""
    bits = v.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    ulp_exp = tl.maximum(exp, -6) - 3  # 3 mantissa bits; below 2^-6 the subnormal step 2^-9
    ulp = ((ulp_exp + 127) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((127 - ulp_exp) << 23).to(tl.float32, bitcast=True)  # multiply: exact, unlike approximate `/`
    mag = ((tl.abs(v) * inv_ulp + _ROUND_MAGIC) - _ROUND_MAGIC) * ulp  # powers of two: only the add rounds
    return (mag.to(tl.int32, bitcast=True) | ((bits >> 31) << 31)).to(tl.float32, bitcast=True)


@triton.jit
def _quant_code(x, scale, QMAX: tl.constexpr):
    return _round_e4m3(tl.clamp(tl.math.div_rn(x, scale), -QMAX, QMAX))


@triton.jit
def _quant_per_token_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, BLOCK: tl.constexpr,
):
    """grid (T,): one row; pass 1 takes the amax over K in BLOCK chunks, pass 2 writes the codes."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), FLOOR), QMAX)
    for k0 in range(0, K, BLOCK):
        m = k0 + cols < K
        x = tl.load(x_row + k0 + cols, mask=m, other=0.0).to(tl.float32)
        q = _quant_code(x, scale, QMAX)
        tl.store(q_ptr + row * stride_q + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row, scale)


@triton.jit
def _quant_per_group_kernel(
    x_ptr, q_ptr, s_ptr, G, stride_x, stride_q, stride_s,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, GROUP: tl.constexpr, BG: tl.constexpr,
):
    """grid (T, cdiv(G, BG)): groups [g0, g0+BG) of one row as a [BG, GROUP] tile, in one pass."""
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BG + tl.arange(0, BG)  # [BG]
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [BG, GROUP]
    m = (g < G)[:, None]
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), FLOOR), QMAX)  # [BG]
    q = _quant_code(x, scale[:, None], QMAX)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row * stride_s + g, scale, mask=g < G)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x [T,K]
    """(q[T,K] e4m3, scale[T,1] fp32); see reference.quant_fp8_per_token."""
    x = _rows(x)
    n_tok, k = x.shape
    q = torch.empty(n_tok, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(n_tok, 1, dtype=torch.float32, device=x.device)
    if n_tok == 0:
        return q, scale
    block = min(triton.next_power_of_2(k), 2048)
    _quant_per_token_kernel[(n_tok,)](
        x, q, scale, k, x.stride(0), q.stride(0),
        QMAX=FP8_MAX, FLOOR=FP8_AMAX_FLOOR, BLOCK=block, num_warps=4,
    )
    return q, scale


def quant_fp8_per_group(x: torch.Tensor, group: int = 128) -> tuple[torch.Tensor, torch.Tensor]:  # x [T,K]
    """(q[T,K] e4m3, scale[T,K/group] fp32); `group` a power of two; see reference.quant_fp8_per_group."""
    x = _rows(x)
    n_tok, k = x.shape
    if k % group or group & (group - 1):
        raise ValueError(f"quant_fp8_per_group: K={k} must be a multiple of group={group}, a power of two")
    n_groups = k // group
    q = torch.empty(n_tok, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(n_tok, n_groups, dtype=torch.float32, device=x.device)
    if n_tok == 0 or n_groups == 0:
        return q, scale
    bg = max(1, min(triton.next_power_of_2(n_groups), 2048 // group))
    _quant_per_group_kernel[(n_tok, triton.cdiv(n_groups, bg))](
        x, q, scale, n_groups, x.stride(0), q.stride(0), scale.stride(0),
        QMAX=FP8_MAX, FLOOR=FP8_AMAX_FLOOR, GROUP=group, BG=bg, num_warps=4,
    )
    return q, scale


__all__ = ["quant_fp8_per_group", "quant_fp8_per_token"]
