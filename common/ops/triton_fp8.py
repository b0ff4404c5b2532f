"""Triton twins of the FP8 activation quantisers in `reference.py`: quant_fp8_per_token,
quant_fp8_per_group, and the producers fused with them: rms_norm_quant_fp8,
fused_add_rms_norm_quant_fp8, silu_and_mul_quant_fp8 (one read of the producer's input and one
write of codes and scales, instead of a round trip of the activation through memory).

Bit-equal to the twins (codes and scales): the math is fp32 with IEEE division (`div_rn`), and the
round to E4M3 is to nearest even. On sm_89 and newer the cast itself does it (`hw_round`: one
conversion instruction per two values); elsewhere, the CPU interpreter included, `_round_e4m3`
rounds in fp32 before a cast that is then exact, since the interpreter's conversion drops the carry
into the next binade (e.g. 31.99 -> 16). The GPU tests hold the hardware path to the same codes.
The fused kernels run the producer with the unfused kernel's own code (`triton_norm._inv_rms`,
`triton_norm._silu_mul`), round it to the activation dtype and quantise that, so they are bit-equal
to the unfused pair too. Rows must have a contiguous last dim (others are copied first); loads
along it are contiguous, so they vectorise.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from common.ops.pdl import pdl_kwargs, pdl_start
from common.ops.reference import FP8_AMAX_FLOOR, FP8_MAX
from common.ops.triton_norm import _combined, _inv_rms, _row_warps, _silu_mul, _summand

# silu·mul rows up to this width are computed once and quantised from registers (16 warps: 32 values
# a thread); wider ones take two passes.
ONE_PASS_MAX = 16384
# The per-token quantiser reads a row in blocks of at most this many values, 8 warps a block: one
# pass up to 4096 wide, two above (the second read mostly from L2). Measured on an H100
# (benchmarks/kernels/bench_quant_rows.py): Air's 12288-wide attention output of an 8K prefill 172 ->
# 108 µs against a whole row in registers with 16 warps (99 µs floor), one token 4.4 -> 3.7 µs; 8K rows
# of 4096: 41 -> 37 µs.
# Many short rows (the MoE intermediate of a prefill: 9 rows a token, 1408 wide on Air) go faster in
# small programs, more of them resident an SM: 73728 rows of 1408, 193 -> 144 µs with blocks of 512 and
# 2 warps (103 µs floor); a decode step's few rows keep the wide block (9 rows: 2.3 µs against 3.6).
TOKEN_BLOCK_MAX = 4096
TOKEN_WARPS_MAX = 8
MANY_ROWS = 16384  # from this many rows of at most SHORT_ROW values: blocks of 512, 2 warps
SHORT_ROW = 2048
# The fused residual add + RMSNorm + quantiser takes at most 8 warps a row from this many rows on (8K
# rows of 4096: 94.5 -> 85.8 µs, of 5120: 194 -> 148; 256 rows of 4096: 6.1 -> 5.0), and a whole
# row's 16 warps below it (one row of 4096: 2.7 µs against 3.0 with 8).
NORM_ROWS_8_WARPS = 32
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
def _quant_code(x, scale, QMAX: tl.constexpr, HW: tl.constexpr):
    """x / scale clamped to +-QMAX and rounded to E4M3 (HW: left to the caller's cast, which the
    hardware rounds to nearest even, as `_round_e4m3` does)."""
    v = tl.clamp(tl.math.div_rn(x, scale), -QMAX, QMAX)
    if HW:
        return v
    return _round_e4m3(v)


@triton.jit
def _row_scale(row_ptr, K, valid, QMAX: tl.constexpr, FLOOR: tl.constexpr, CHUNK: tl.constexpr):
    """The per-token scale of one row of K values at row_ptr (read CHUNK at a time; none where not
    valid): max(amax, FLOOR) / QMAX, as the quantisers take it."""
    cols = tl.arange(0, CHUNK)
    amax = tl.zeros((CHUNK,), dtype=tl.float32)
    for c0 in range(0, K, CHUNK):
        amax = tl.maximum(amax, tl.abs(tl.load(row_ptr + c0 + cols, mask=(cols < K - c0) & valid, other=0.0)
                                       .to(tl.float32)))
    return tl.math.div_rn(tl.maximum(tl.max(amax), FLOOR), QMAX)


@triton.jit
def _dot(a, b, acc, SWAP: tl.constexpr):
    """acc + a b^T for a [BM,BK], b [BN,BK]: [BM,BN], or with SWAP its transpose [BN,BM]. (One
    return: compiled, a return inside a constexpr branch does not end the function.)
    Triton's sm_90 default accumulates the FP8 MMAs of the whole K loop without promotion (what SGLang's
    and vLLM's FP8 MoE run). Measured on an H100 (2026-12-06): 1.5e-2 relative error against the twin
    at M >= 64; promoting after every K block (max_num_imprecise_acc=BK) cut that to 6e-3 but cost
    2.6x at M = 2048 with the tables tuned for this kernel, and left the model-level error unchanged."""
    if SWAP:
        out = tl.dot(b, a.T, acc)
    else:
        out = tl.dot(a, b.T, acc)
    return out


@triton.jit
def _scaled_dot(a, b, sa, sb, SWAP: tl.constexpr):
    """(a b^T) * sa[row] * sb[col] in the orientation of _dot (a fresh accumulator: one K block)."""
    if SWAP:
        out = tl.dot(b, a.T) * sb[:, None] * sa[None, :]
    else:
        out = tl.dot(a, b.T) * sa[:, None] * sb[None, :]
    return out


@functools.cache
def hw_round(device: torch.device) -> bool:
    """Whether the fp32 -> E4M3 cast of `device` rounds to nearest even in hardware (sm_89 and newer:
    one conversion instruction per two values, against ~14 instructions of `_round_e4m3`)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


@triton.jit
def _quant_per_token_kernel(
    x_ptr, q_ptr, s_ptr, K, stride_x, stride_q,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, HW: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """grid (T,): one row. A row that fits one BLOCK is loaded once and quantised from registers;
    a longer one takes pass 1 (the amax over K in BLOCK chunks) and pass 2 (the codes)."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK)
    if BLOCK >= K:
        m = cols < K
        x = tl.load(x_row + cols, mask=m, other=0.0).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), FLOOR), QMAX)
        tl.store(q_ptr + row * stride_q + cols, _quant_code(x, scale, QMAX, HW).to(q_ptr.dtype.element_ty), mask=m)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            x = tl.load(x_row + k0 + cols, mask=k0 + cols < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(x))
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), FLOOR), QMAX)
        for k0 in range(0, K, BLOCK):
            m = k0 + cols < K
            x = tl.load(x_row + k0 + cols, mask=m, other=0.0).to(tl.float32)
            q = _quant_code(x, scale, QMAX, HW)
            tl.store(q_ptr + row * stride_q + k0 + cols, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row, scale)


@triton.jit
def _quant_per_group_kernel(
    x_ptr, q_ptr, s_ptr, G, stride_x, stride_q, stride_s,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, HW: tl.constexpr, GROUP: tl.constexpr, BG: tl.constexpr, PDL: tl.constexpr,
):
    """grid (T, cdiv(G, BG)): groups [g0, g0+BG) of one row as a [BG, GROUP] tile, in one pass."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BG + tl.arange(0, BG)  # [BG]
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [BG, GROUP]
    m = (g < G)[:, None]
    x = tl.load(x_ptr + row * stride_x + cols, mask=m, other=0.0).to(tl.float32)
    scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=1), FLOOR), QMAX)  # [BG]
    q = _quant_code(x, scale[:, None], QMAX, HW)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row * stride_s + g, scale, mask=g < G)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _token_launch(n_tok: int, k: int) -> tuple[int, int]:
    """(row block, warps) of the per-token quantiser for n_tok rows of k values."""
    if n_tok >= MANY_ROWS and k <= SHORT_ROW:
        return min(512, triton.next_power_of_2(k)), 2
    block = min(triton.next_power_of_2(k), TOKEN_BLOCK_MAX)
    return block, min(TOKEN_WARPS_MAX, _row_warps(block))


def quant_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # x [T,K]
    """(q[T,K] e4m3, scale[T,1] fp32); see reference.quant_fp8_per_token."""
    x = _rows(x)
    n_tok, k = x.shape
    q = torch.empty(n_tok, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(n_tok, 1, dtype=torch.float32, device=x.device)
    if n_tok == 0:
        return q, scale
    block, warps = _token_launch(n_tok, k)
    _quant_per_token_kernel[(n_tok,)](
        x, q, scale, k, x.stride(0), q.stride(0),
        QMAX=FP8_MAX, FLOOR=FP8_AMAX_FLOOR, HW=hw_round(x.device), BLOCK=block, num_warps=warps,
        **pdl_kwargs(x.device),
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
        QMAX=FP8_MAX, FLOOR=FP8_AMAX_FLOOR, HW=hw_round(x.device), GROUP=group, BG=bg, num_warps=4,
        **pdl_kwargs(x.device),
    )
    return q, scale


@triton.jit
def _quant_store(v, cols, m, g, n_groups, q_row, s_row, QMAX: tl.constexpr, FLOOR: tl.constexpr, HW: tl.constexpr,
                 PER_GROUP: tl.constexpr):
    """Quantise the fp32 tile v [NG, GB] (row r of the tile = group g[r]; padding lanes 0) and store
    codes at q_row + cols (mask m) and scales at s_row: one per group, or one for the whole tile."""
    if PER_GROUP:
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), axis=1), FLOOR), QMAX)  # [NG]
        q = _quant_code(v, scale[:, None], QMAX, HW)
        tl.store(s_row + g, scale, mask=g < n_groups)
    else:
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v)), FLOOR), QMAX)
        q = _quant_code(v, scale, QMAX, HW)
        tl.store(s_row, scale)
    tl.store(q_row + cols, q.to(q_row.dtype.element_ty), mask=m)


@triton.jit
def _norm_quant_kernel(
    x_ptr, r_ptr, w_ptr, q_ptr, s_ptr, res_out_ptr, normed_ptr,
    H, n_groups, stride_x, stride_xk, stride_r, stride_q, stride_s, stride_ro, stride_n, eps,
    HAS_RES: tl.constexpr, KEEP: tl.constexpr, PER_GROUP: tl.constexpr, ROWS: tl.constexpr,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, HW: tl.constexpr, NG: tl.constexpr, GB: tl.constexpr, PDL: tl.constexpr,
):
    """One row per program, held as an [NG, GB] tile (GB = the group when PER_GROUP): s = x
    (+ residual, rounded to the activation dtype and stored), normed = w * (s * inv_rms(s)) in the
    activation dtype (stored when KEEP), then normed quantised to FP8. ROWS > 0: x is ROWS rows a
    token (stride_xk apart: a fused MoE's rows, a split-K GEMM's slices), added up first (`_combined`)."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.arange(0, NG)
    cols = g[:, None] * GB + tl.arange(0, GB)[None, :]  # [NG, GB]
    m = cols < H
    dt = res_out_ptr.dtype.element_ty  # the activation dtype (x's own when there is no residual)
    x = _combined(x_ptr + row * stride_x, stride_xk, cols, m, dt, ROWS)
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + cols, mask=m, other=0.0)
        x = (x + r).to(dt)  # rounded like the reference's sum
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=m)
    xf = x.to(tl.float32)
    inv = _inv_rms(xf, H, eps)
    w = tl.load(w_ptr + cols, mask=m, other=0.0).to(dt)
    normed = (xf * inv).to(dt) * w
    if KEEP:
        tl.store(normed_ptr + row * stride_n + cols, normed, mask=m)
    _quant_store(normed.to(tl.float32), cols, m, g, n_groups, q_ptr + row * stride_q, s_ptr + row * stride_s,
                 QMAX, FLOOR, HW, PER_GROUP)


def _check_group(name: str, width: int, group: int) -> None:
    if group < 0 or group & (group - 1) or (group and width % group):
        raise ValueError(f"{name}: group={group} must be 0 (per token) or a power of two dividing {width}")


def _quant_out(n_tok: int, width: int, group: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.empty(n_tok, width, dtype=torch.float8_e4m3fn, device=device)
    scale = torch.empty(n_tok, width // group if group else 1, dtype=torch.float32, device=device)
    return q, scale


def _norm_quant(
    x: torch.Tensor, residual: torch.Tensor | None, w: torch.Tensor, eps: float, group: int, keep_normed: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Launcher of _norm_quant_kernel: (q, scale, x + residual or None, normed or None). x [T,k,H]
    (with a residual): rows to add up first (a fused MoE's rows, a split-K GEMM's slices)."""
    if residual is None:
        x, rows, stride_k, dt = _rows(x), 0, 0, x.dtype
    else:
        x, rows, stride_k, dt = _summand(x, residual)
    n_tok, h = x.shape[0], x.shape[-1]
    _check_group("rms_norm_quant_fp8", h, group)
    q, scale = _quant_out(n_tok, h, group, x.device)
    new_res = torch.empty(n_tok, h, dtype=dt, device=x.device) if residual is not None else None
    normed = torch.empty(n_tok, h, dtype=dt, device=x.device) if keep_normed else None
    if n_tok == 0:
        return q, scale, new_res, normed
    r = _rows(residual) if residual is not None else x
    gb = group or min(128, triton.next_power_of_2(h))
    ng = triton.next_power_of_2(triton.cdiv(h, gb))
    res_out = new_res if new_res is not None else x  # also carries the activation dtype
    normed_out = normed if normed is not None else res_out
    _norm_quant_kernel[(n_tok,)](
        x, r, w, q, scale, res_out, normed_out, h, triton.cdiv(h, gb),
        x.stride(0), stride_k, r.stride(0), q.stride(0), scale.stride(0), res_out.stride(0),
        normed_out.stride(0), eps,
        HAS_RES=residual is not None, KEEP=keep_normed, PER_GROUP=group > 0, ROWS=rows, QMAX=FP8_MAX,
        FLOOR=FP8_AMAX_FLOOR,
        HW=hw_round(x.device),
        NG=ng, GB=gb, num_warps=_row_warps(ng * gb) if n_tok < NORM_ROWS_8_WARPS else min(8, _row_warps(ng * gb)),
        **pdl_kwargs(x.device),
    )
    return q, scale, new_res, normed


def rms_norm_quant_fp8(
    x: torch.Tensor,  # [T,H]
    w: torch.Tensor,  # [H]
    eps: float,
    group: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(q[T,H] e4m3, scale[T,1] or [T,H/group] fp32); see reference.rms_norm_quant_fp8."""
    q, scale, _, _ = _norm_quant(x, None, w, eps, group, False)
    return q, scale


def fused_add_rms_norm_quant_fp8(
    x: torch.Tensor,  # [T,H]
    residual: torch.Tensor,  # [T,H]
    w: torch.Tensor,  # [H]
    eps: float,
    group: int = 0,
    keep_normed: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q, scale, x + residual, normed or None) in one pass; see reference.fused_add_rms_norm_quant_fp8."""
    q, scale, new_res, normed = _norm_quant(x, residual, w, eps, group, keep_normed)
    assert new_res is not None
    return q, scale, new_res, normed


@triton.jit
def _silu_quant_token_kernel(x_ptr, q_ptr, s_ptr, I, stride_x, stride_q,
                             QMAX: tl.constexpr, FLOOR: tl.constexpr, HW: tl.constexpr, BLOCK: tl.constexpr,
                             PDL: tl.constexpr):
    """grid (T,): one row of silu(gate) * up. Up to BLOCK columns it is computed once and quantised
    from registers; a longer row takes pass 1 (the amax over I in BLOCK chunks) and pass 2 (the
    same values recomputed, their codes)."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK)
    if BLOCK >= I:
        m = cols < I
        v = _silu_mul(x_row, I, cols, m).to(tl.float32)
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), axis=0), FLOOR), QMAX)
        tl.store(q_ptr + row * stride_q + cols, _quant_code(v, scale, QMAX, HW).to(q_ptr.dtype.element_ty), mask=m)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for i0 in range(0, I, BLOCK):
            v = _silu_mul(x_row, I, i0 + cols, i0 + cols < I).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        scale = tl.math.div_rn(tl.maximum(tl.max(amax, axis=0), FLOOR), QMAX)
        for i0 in range(0, I, BLOCK):
            m = i0 + cols < I
            q = _quant_code(_silu_mul(x_row, I, i0 + cols, m).to(tl.float32), scale, QMAX, HW)
            tl.store(q_ptr + row * stride_q + i0 + cols, q.to(q_ptr.dtype.element_ty), mask=m)
    tl.store(s_ptr + row, scale)


@triton.jit
def _silu_quant_group_kernel(x_ptr, q_ptr, s_ptr, I, n_groups, stride_x, stride_q, stride_s,
                             QMAX: tl.constexpr, FLOOR: tl.constexpr, HW: tl.constexpr, GROUP: tl.constexpr,
                             BG: tl.constexpr,
                             PDL: tl.constexpr):
    """grid (T, cdiv(G, BG)): groups [g0, g0+BG) of one row as a [BG, GROUP] tile, in one pass."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1) * BG + tl.arange(0, BG)  # [BG]
    cols = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]  # [BG, GROUP]
    m = (g < n_groups)[:, None] & (cols < I)
    v = _silu_mul(x_ptr + row * stride_x, I, cols, m).to(tl.float32)
    _quant_store(v, cols, m, g, n_groups, q_ptr + row * stride_q, s_ptr + row * stride_s, QMAX, FLOOR, HW, True)


def silu_and_mul_quant_fp8(gate_up: torch.Tensor, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """gate_up [T,2I] -> (q[T,I] e4m3, scale[T,1] or [T,I/group] fp32); see reference.silu_and_mul_quant_fp8."""
    x = _rows(gate_up)
    n_tok, width = x.shape
    inter = width // 2
    _check_group("silu_and_mul_quant_fp8", inter, group)
    q, scale = _quant_out(n_tok, inter, group, x.device)
    if n_tok == 0:
        return q, scale
    if group == 0:
        block = min(ONE_PASS_MAX, triton.next_power_of_2(inter))
        _silu_quant_token_kernel[(n_tok,)](x, q, scale, inter, x.stride(0), q.stride(0),
                                           QMAX=FP8_MAX, FLOOR=FP8_AMAX_FLOOR, HW=hw_round(x.device), BLOCK=block,
                                           num_warps=_row_warps(block), **pdl_kwargs(x.device))
    else:
        n_groups = inter // group
        bg = max(1, min(triton.next_power_of_2(n_groups), 2048 // group))
        _silu_quant_group_kernel[(n_tok, triton.cdiv(n_groups, bg))](
            x, q, scale, inter, n_groups, x.stride(0), q.stride(0), scale.stride(0),
            QMAX=FP8_MAX, FLOOR=FP8_AMAX_FLOOR, HW=hw_round(x.device), GROUP=group, BG=bg, num_warps=4,
        **pdl_kwargs(x.device),
        )
    return q, scale


__all__ = ["fused_add_rms_norm_quant_fp8", "quant_fp8_per_group", "quant_fp8_per_token", "rms_norm_quant_fp8",
           "silu_and_mul_quant_fp8"]
