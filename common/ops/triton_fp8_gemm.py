"""Triton FP8 GEMMs: the CUDA twin of `reference.fp8_block_linear`, and a channel-scaled twin of
`reference.fp8_linear` that the benchmark sets against cuBLAS (it also takes K that cuBLAS cannot).

One kernel, two scale layouts. Both operands are E4M3 with K contiguous: x [M,K] and the weight
[N,K] as stored, read as the K-major B operand Hopper's FP8 MMA wants (no transposed copy). The
accumulator is fp32.
- block (DeepSeek-V3 style): x has one scale per 1 x b group, the weight one per b x b block, and
  BLOCK_K = b, so each K step's partial product is scaled by x_scale[m, k/b] * w_scale[n/b, k/b] as
  it is added to the accumulator;
- channel: x has one scale per row, the weight one per output channel; they factor out of the K sum
  and are applied once in the epilogue (K may end in a partial tile).
Tiles (`default_config`): few-token calls (decode) take BLOCK_M 16-64 and N tiles narrow enough
for the grid to cover every SM (a GEMV is bound by the weight bytes in flight); many-token calls
take 128 x 128 tiles in grouped order for L2 reuse. Results match the twins to fp32 accumulation
order and the output rounding.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from common.ops.pdl import pdl_kwargs, pdl_start, prefetch_programs, prefetch_rows
from common.ops.reference import FP8_AMAX_FLOOR, FP8_MAX
from common.ops.triton_fp8 import _dot, _quant_code, _row_scale, _scaled_dot, hw_round
from common.ops.triton_moe import weight_descriptor

TUNED_PATH = Path(__file__).with_name("fp8_gemm_tuned.json")


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int  # == the scale block in block mode
    group_m: int
    num_warps: int
    num_stages: int
    split_k: int = 1  # K slices summed by `_split_k_reduce` (few-token calls: more programs in flight)
    swap: bool = False  # the tile as W x^T ([BLOCK_N, BLOCK_M]): weight rows on the MMA's 64-row side
    tma: bool = False  # weight tiles through the tensor memory accelerator (where the layout allows)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, bias_ptr, c_ptr, M, N, K, k_per_split, early_programs,
    stride_am, stride_bn, stride_cm, stride_asm, stride_ask, stride_bsn, stride_bsk,
    BLOCK_SCALES: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, PDL: tl.constexpr,
    A_QUANT: tl.constexpr = False, QMAX: tl.constexpr = 448.0, FLOOR: tl.constexpr = 2.0**-30, HW: tl.constexpr = True,
    ROW_CHUNK: tl.constexpr = 512, amax_ptr=None, stride_xm=0, AMAX_PARTS: tl.constexpr = 0,
    AMAX_PAD: tl.constexpr = 1, ONE_ROW: tl.constexpr = False, SWAP: tl.constexpr = False, b_desc=None,
    TMA: tl.constexpr = False,
):
    """C[M,N] = (A * a_scale) @ (B * b_scale)^T (+ bias); grid (cdiv(M,BM) * cdiv(N,BN), SPLIT_K),
    grouped. With SPLIT_K > 1 program (t, s) sums K in [s * k_per_split, (s+1) * k_per_split) and
    writes its scaled fp32 partial to c[s] ([SPLIT_K, M, N]); `_split_k_reduce` adds them up.
    PDL: the first early_programs programs in launch order (t fastest) ask L2 for their weight slice
    before the wait.
    A_QUANT: A is the unquantised activation (bf16 / fp16 / fp32) and as_ptr is unused: each A tile is
    quantised as it is loaded, with the codes and scales `triton_fp8` would give. Block scales: each
    1 x BLOCK_K group from its own amax. Channel: every program first takes its rows' amax over the
    whole of K (ROW_CHUNK columns a step: the rows are read once more, from L2), whatever its slice;
    or, AMAX_PARTS > 0, as the max of the AMAX_PARTS partial amaxes its producer wrote per row at
    amax_ptr (row stride stride_xm): the same value, without the re-read. ONE_ROW (channel, M == 1):
    only row 0 of the BLOCK_M-row tile is real, so only its BLOCK_K values are quantised a K step (the
    next step's loaded before this step's MMA) and the tile's other rows are zero codes, instead of
    dividing the whole padded tile.
    SWAP: each K step computes the tile's transpose, W x^T ([BLOCK_N, BLOCK_M], `triton_fp8._dot`), so
    at few tokens the weight rows fill the side of the MMA that needs 64 rows and sm_90 runs it as a
    warpgroup MMA from shared memory (unswapped, a 16-row tile is an mma.sync on values converted in
    registers); the accumulator is transposed once before the epilogue.
    TMA: the weight tiles come through the bulk-copy engine (b_desc: the weights [N, K] in [BLOCK_N,
    BLOCK_K] tiles; rows past N and columns past K read as zeros), not through per-thread loads."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * grid_n
    first_m = (pid // per_group) * GROUP_M
    rows = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    k_lo = pid_k * k_per_split  # a multiple of BLOCK_K
    k_hi = tl.minimum(K, k_lo + k_per_split)
    if PDL and pid_k * tl.num_programs(0) + pid < early_programs:  # weights: no earlier kernel writes them
        prefetch_rows(b_ptr, tl.minimum(offs_n, N - 1), stride_bn, k_lo, k_hi)
    pdl_start(PDL)
    a_ptrs = a_ptr + offs_m[:, None] * stride_am + (k_lo + offs_k)[None, :]  # [BM,BK]
    b_ptrs = b_ptr + offs_n[:, None] * stride_bn + (k_lo + offs_k)[None, :]  # [BN,BK]: K-major
    n0 = (pid_n * BLOCK_N).to(tl.int32)  # TMA: the tile's first weight row
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BLOCK_SCALES:  # K % BLOCK_K == 0; scale column k0 / BLOCK_K
        as_ptrs = as_ptr + offs_m * stride_asm  # [BM]
        bs_ptrs = bs_ptr + (offs_n // BLOCK_K) * stride_bsn  # [BN]
        for kb in range(k_lo // BLOCK_K, tl.cdiv(k_hi, BLOCK_K)):
            a = tl.load(a_ptrs, mask=mask_m[:, None], other=0.0)
            if TMA:
                b = b_desc.load([n0, kb * BLOCK_K])
            else:
                b = tl.load(b_ptrs, mask=mask_n[:, None], other=0.0)
            if A_QUANT:  # the group's scale from its own amax (rows past M: zeros, the floor)
                af = a.to(tl.float32)
                sa = tl.math.div_rn(tl.maximum(tl.max(tl.abs(af), axis=1), FLOOR), QMAX)
                a = _quant_code(af, sa[:, None], QMAX, HW).to(b.dtype)
            else:
                sa = tl.load(as_ptrs + kb * stride_ask, mask=mask_m, other=0.0)
            sb = tl.load(bs_ptrs + kb * stride_bsk, mask=mask_n, other=0.0)
            acc += _scaled_dot(a, b, sa, sb, SWAP)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if SWAP:
            acc = acc.T
    else:
        if A_QUANT and AMAX_PARTS > 0:  # the producer's partial amaxes of each row
            parts = tl.arange(0, AMAX_PAD)
            amax = tl.max(tl.load(amax_ptr + offs_m[:, None] * stride_xm + parts[None, :],
                                  mask=mask_m[:, None] & (parts < AMAX_PARTS)[None, :], other=0.0), axis=1)
            sa = tl.math.div_rn(tl.maximum(amax, FLOOR), QMAX)  # [BM]
        elif A_QUANT and ONE_ROW:  # row 0's amax over the whole of K
            sa = tl.zeros((BLOCK_M,), dtype=tl.float32) + _row_scale(a_ptr, K, True, QMAX, FLOOR, ROW_CHUNK)
        elif A_QUANT:  # the row scale needs the whole row's amax, not only this slice's
            cols = tl.arange(0, ROW_CHUNK)
            row_ptrs = a_ptr + offs_m[:, None] * stride_am + cols[None, :]
            amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for c0 in range(0, K, ROW_CHUNK):
                x = tl.load(row_ptrs + c0, mask=mask_m[:, None] & (cols < K - c0)[None, :], other=0.0)
                amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
            sa = tl.math.div_rn(tl.maximum(amax, FLOOR), QMAX)  # [BM]
        if A_QUANT and ONE_ROW:
            first = (tl.arange(0, BLOCK_M) == 0)[:, None]
            sa_row = tl.max(sa)  # row 0's: padded rows hold the floor's scale, never larger
            a_next = tl.load(a_ptr + k_lo + offs_k, mask=offs_k < k_hi - k_lo, other=0.0)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            mask_k = offs_k < k_hi - k0
            if TMA:
                b = b_desc.load([n0, k0])
            else:
                b = tl.load(b_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if A_QUANT and ONE_ROW:
                q = _quant_code(a_next.to(tl.float32), sa_row, QMAX, HW)
                a_next = tl.load(a_ptr + k0 + BLOCK_K + offs_k, mask=offs_k < k_hi - k0 - BLOCK_K, other=0.0)
                a = tl.where(first, q[None, :], 0.0).to(b.dtype)
            else:
                a = tl.load(a_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
                if A_QUANT:
                    a = _quant_code(a.to(tl.float32), sa[:, None], QMAX, HW).to(b.dtype)
            acc = _dot(a, b, acc, SWAP)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
        if SWAP:
            acc = acc.T
        if not A_QUANT:
            sa = tl.load(as_ptr + offs_m * stride_asm, mask=mask_m, other=0.0)
        sb = tl.load(bs_ptr + offs_n * stride_bsn, mask=mask_n, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_n[None, :]
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
    else:
        c_ptrs = c_ptr + pid_k * M * N + offs_m[:, None] * N + offs_n[None, :]
        tl.store(c_ptrs, acc, mask=out_mask)


@triton.jit
def _split_k_reduce(part_ptr, bias_ptr, c_ptr, M, N, stride_cm,
                    SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """c[m, n] = sum_s part[s, m, n] (+ bias[n]), the splits added in order (deterministic)."""
    pdl_start(PDL)
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT_K):
        acc += tl.load(part_ptr + (s * M + row) * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(c_ptr + row * stride_cm + offs, acc.to(c_ptr.dtype.element_ty), mask=mask)


@functools.cache
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_config(m: int, n: int, block_k: int, device: torch.device, k: int = 0) -> GemmConfig:
    """Tiles by token count. Up to 64 tokens the call is a GEMV bound by the weight bytes in flight:
    one BLOCK_M 16/32/64 row of 32-wide N tiles, 6 stages, and K split (`k` given; each slice at least
    4 K steps, at most 8 slices) until about two programs run per SM at <= 16 tokens, one at 17-64
    (more slices cost more at 64 tokens than they hide). Over the few-token sweep of Air's projections
    this rule is within 6 % of each shape's best tiles on average (26 % at worst); the tuned table
    (`tuned_config`) holds the best ones. More tokens take 128 x 128 tiles (8 warps), else 64 x 128,
    64 x 64, in grouped order for L2 reuse."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 132
    if m <= 64:
        bm = 16 if m <= 16 else 32 if m <= 32 else 64
        bn = 32
        programs = (2 if m <= 16 else 1) * sms
        split = max(1, min(8, k // (4 * block_k), triton.cdiv(programs, triton.cdiv(n, bn))))
        return GemmConfig(bm, bn, block_k, 1, 4, 6, split)
    for bm, bn, warps, stages in ((128, 128, 8, 3), (64, 128, 4, 4)):
        if triton.cdiv(m, bm) * triton.cdiv(n, bn) >= sms:
            return GemmConfig(bm, bn, block_k, 8, warps, stages)
    return GemmConfig(64, 64, block_k, 8, 4, 4)


@functools.cache
def _tuned_tables() -> dict:
    return json.loads(TUNED_PATH.read_text())["tables"]


@functools.cache
def _device_name(device_index: int) -> str:
    return torch.cuda.get_device_name(device_index)


def _tuned_entry(m: int, n: int, k: int, device: torch.device) -> dict | None:
    if device.type != "cuda" or m > 64:
        return None
    return _tuned_tables().get(_device_name(device.index or 0), {}).get(f"{n},{k}", {}).get("1" if m <= 16 else "64")


def tuned_config(m: int, n: int, k: int, device: torch.device) -> GemmConfig | None:
    """The measured best few-token tiles of the channel GEMM for this GPU and projection shape
    (fp8_gemm_tuned.json: bucket '1' serves M <= 16, '64' serves 17-64), or None."""
    entry = _tuned_entry(m, n, k, device)
    if entry is None:
        return None
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    return GemmConfig(bm, entry["block_n"], 128, 1, entry["num_warps"], entry["num_stages"], entry["split_k"],
                      entry.get("swap", False), entry.get("tma", False))


def cublas_measured_faster(m: int, n: int, k: int, device: torch.device) -> bool:
    """Whether the sweep that tuned this shape's few-token bucket timed cuBLAS below its best tiles
    (then the caller runs cuBLAS: the faster of the two per shape, as measured)."""
    entry = _tuned_entry(m, n, k, device)
    return entry is not None and entry["cublas_us"] < entry["us"]


def fp8_gemm(
    x_q: torch.Tensor,  # [M,K] e4m3, or (x_scale None) the unquantised activation
    x_scale: torch.Tensor | None,  # block: [M,K/b]; channel: [M,1] fp32; None: x_q quantised in the kernel
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # block: [ceil(N/b), K/b]; channel: [N,1] fp32
    bias: torch.Tensor | None,  # [N]
    out_dtype: torch.dtype,
    block: int,  # 0: channel scales
    config: GemmConfig | None = None,
    unsummed: bool = False,
    x_amax: torch.Tensor | None = None,  # [M,G] fp32 (x_scale None, channel): partial row amaxes of x
) -> torch.Tensor:
    """The launcher both ops share (the benchmark passes its own `config`). x_scale None: x_q is
    bf16 / fp16 / fp32 and the kernel quantises it as it loads it (A_QUANT), dynamically per token
    (channel) or per 1 x block group, to the codes and scales `triton_fp8` gives. unsummed (no bias):
    with K split, the fp32 slices as [M, S, N] (a view of [S, M, N]) instead of their reduce, which
    adds them in the same order to +0.0 (`reference.combine_rows`). x_amax: x's row amax as the max
    over G parts its producer wrote (the quantiser's amax exactly), so no program re-reads the row."""
    x_q = x_q if x_q.stride(-1) == 1 else x_q.contiguous()
    w_q = w_q if w_q.stride(-1) == 1 else w_q.contiguous()
    (m, k), n = x_q.shape, w_q.shape[0]
    if block and (k % block or block & (block - 1) or block < 32):
        raise ValueError(f"fp8_block_linear: block={block} must be a power of two >= 32 dividing K={k}")
    out = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return out
    cfg = config or (None if block else tuned_config(m, n, k, x_q.device)) or default_config(
        m, n, block or 128, x_q.device, k)
    desc = weight_descriptor(w_q, cfg.block_n, cfg.block_k, cfg.tma)
    if block and cfg.block_k != block:
        raise ValueError(f"fp8_block_linear: BLOCK_K={cfg.block_k} must equal the scale block {block}")
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)  # no empty slice
    has_bias = bias is not None
    dest = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x_q.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    launch = pdl_kwargs(x_q.device)
    # few tokens: the weight stream is the whole cost, so start it behind the previous kernel
    prefetch = prefetch_programs(k_per_split * cfg.block_n, launch["PDL"] and m <= 64)
    a_quant = x_scale is None
    a_scale = w_scale if a_quant else x_scale  # (unused under A_QUANT)
    amax_args: dict = {}
    if x_amax is not None:
        if not a_quant or block or x_amax.dim() != 2 or x_amax.shape[0] != m or x_amax.stride(-1) != 1:
            raise ValueError("fp8_gemm: x_amax takes an unquantised x, channel scales and [M,G] contiguous rows")
        amax_args = {"amax_ptr": x_amax, "stride_xm": x_amax.stride(0), "AMAX_PARTS": x_amax.shape[1],
                     "AMAX_PAD": triton.next_power_of_2(x_amax.shape[1])}
    _fp8_gemm_kernel[grid](
        x_q, a_scale, w_q, w_scale, bias if has_bias else w_scale, dest, m, n, k, k_per_split, prefetch,
        x_q.stride(0), w_q.stride(0), out.stride(0), a_scale.stride(0), a_scale.stride(1),
        w_scale.stride(0), w_scale.stride(1),
        BLOCK_SCALES=block > 0, HAS_BIAS=has_bias, SPLIT_K=split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        A_QUANT=a_quant, QMAX=FP8_MAX, FLOOR=FP8_AMAX_FLOOR, HW=hw_round(x_q.device),
        ONE_ROW=a_quant and not block and m == 1, SWAP=cfg.swap, b_desc=desc, TMA=desc is not None,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch, **amax_args,
    )
    if split > 1 and unsummed and not has_bias:
        return dest.permute(1, 0, 2)
    if split > 1:
        reduce_block = 1024
        _split_k_reduce[(m, triton.cdiv(n, reduce_block))](
            dest, bias if has_bias else dest, out, m, n, out.stride(0),
            SPLIT_K=split, HAS_BIAS=has_bias, BLOCK=reduce_block, num_warps=4, **pdl_kwargs(x_q.device))
    return out


def fp8_block_linear(
    x_q: torch.Tensor,  # [T,K] e4m3
    x_scale: torch.Tensor,  # [T,K/b] fp32
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # [ceil(N/b), K/b] fp32
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 128,
) -> torch.Tensor:
    """y[T,N] for 1 x b activation groups and b x b weight blocks, on the Triton kernel (cuBLAS's block
    scaling answered CUBLAS_STATUS_NOT_SUPPORTED on the H100 with CUDA 13, 2026-12-06); see
    reference.fp8_block_linear."""
    return fp8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype, block)


def fp8_linear(
    x_q: torch.Tensor,  # [T,K] e4m3
    x_scale: torch.Tensor,  # [T,1] fp32
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # [N,1] fp32
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The channel-scaled FP8 GEMM in Triton (any K, any float output); see reference.fp8_linear."""
    return fp8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype, 0)


__all__ = ["TUNED_PATH", "GemmConfig", "cublas_measured_faster", "default_config", "fp8_block_linear", "fp8_gemm",
           "fp8_linear", "tuned_config"]
