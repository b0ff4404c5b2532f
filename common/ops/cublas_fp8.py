"""CUDA twin of `reference.fp8_linear`: cuBLAS (`torch._scaled_mm`) for many tokens, the Triton
split-K GEMM of `triton_fp8_gemm.py` for few.

Why cuBLAS rather than a kernel of our own: `torch._scaled_mm` with row-wise scales (one per token
of x, one per output channel of w) is a maintained library GEMM that reaches Hopper's FP8 tensor
cores with the scales applied in its epilogue, so the dense FP8 path needs no kernel to tune or keep
up. Its limits decide where it runs, and `scaled_mm_fits` is the one place that says so: CUDA on
sm_90 or newer, E4M3 operands, fp32 scales shaped [T,1] and [N,1], a bf16 output (the only one
row-wise scaling serves), a bf16 bias or none, K and N multiples of 16, row-major operands on
16-byte boundaries. Every other call on Hopper runs the Triton channel GEMM (any K and N), and off
Hopper the reference twin, so results never depend on the path taken beyond accumulation order and
the output's rounding.

Few tokens (M <= SMALL_M, decode and verify steps) go to the Triton channel GEMM instead: there the
call is a weight-bandwidth GEMV, and cuBLAS's kernels reached only 44-47 % of the read bandwidth at
K = 11-12K (o_proj, down_proj) on the H100, where the Triton kernel splits K to keep about two
programs per SM streaming weights (`docs/performance.md` §7 has both, shape by shape). Where the
sweep that tuned a shape's tiles timed cuBLAS faster still, that shape's bucket stays on cuBLAS.

`fp8_linear_dynamic` (an activation that arrives unquantised) is the CUDA twin of its reference too:
the Triton quantiser, then the path above.

Accumulation: cuBLAS accumulates the FP8 MMAs in the tensor cores' own precision without promoting
to fp32 every few K steps (`use_fast_accum`; from `FAST_ACCUM_ROWS` tokens, 0: every call it takes).
That is what the Triton GEMMs of this package do (Triton's sm_90 default, see `triton_fp8._dot`)
and what the W8A8 CUTLASS kernels of other serving engines run on Hopper (their FP8 schedules are the
"FastAccum" ones). On the H100 it made Air's projections 5-32 % faster at 2048-8192 tokens and up to
11 % at 256 (relative error against the fp32 twin 2.1e-3-3.1e-3, against 1.7e-3 with promotion) and
the 8K prefill at full depth 3.4-3.6 % faster (`docs/performance.md` §7o).

Block FP8 (1 x 128 activation groups, 128 x 128 weight blocks) runs on the Triton kernel of
`triton_fp8_gemm.py`: cuBLAS's block scaling through `torch._scaled_mm` answered
CUBLAS_STATUS_NOT_SUPPORTED for every GLM shape on the H100 with CUDA 13 (2026-12-06).
"""

from __future__ import annotations

import functools

import torch

from common.ops import reference

_ALIGN = 16  # elements (1-byte E4M3) and bytes
SMALL_M = 64  # up to this many tokens the Triton split-K GEMM serves the call
FAST_ACCUM_ROWS = 0  # from this many tokens cuBLAS accumulates without fp32 promotion (0: always; docstring)


@functools.cache
def _has_fp8_tensor_cores(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def _aligned_rows(m: torch.Tensor) -> bool:
    """Row-major with the last dim contiguous, rows and base on 16-byte boundaries."""
    return m.stride(1) == 1 and m.stride(0) % _ALIGN == 0 and m.data_ptr() % _ALIGN == 0


def _row_scale(scale: torch.Tensor, rows: int) -> bool:
    return scale.dtype == torch.float32 and tuple(scale.shape) == (rows, 1) and scale.is_contiguous()


def scaled_mm_fits(
    x_q: torch.Tensor,  # [T,K] e4m3
    x_scale: torch.Tensor,  # [T,1] fp32
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # [N,1] fp32
    bias: torch.Tensor | None,  # [N]
    out_dtype: torch.dtype,
) -> bool:
    """Whether `torch._scaled_mm` with row-wise scales can run this call (else the reference twin)."""
    if x_q.device.type != "cuda" or not _has_fp8_tensor_cores(x_q.device.index or 0):
        return False
    (n_tok, k), n_out = x_q.shape, w_q.shape[0]
    return (
        x_q.dtype == w_q.dtype == torch.float8_e4m3fn
        and out_dtype == torch.bfloat16
        and (bias is None or (bias.dtype == torch.bfloat16 and tuple(bias.shape) == (n_out,)))
        and n_tok > 0 and k % _ALIGN == 0 and n_out % _ALIGN == 0
        and _aligned_rows(x_q) and _aligned_rows(w_q)
        and _row_scale(x_scale, n_tok) and _row_scale(w_scale, n_out)
    )


def fp8_linear(
    x_q: torch.Tensor,  # [T,K] e4m3
    x_scale: torch.Tensor,  # [T,1] fp32
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # [N,1] fp32
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """y[T,N] = (x_q * x_scale) @ (w_q * w_scale)^T (+ bias), accumulated as `FAST_ACCUM_ROWS` says.
    The Triton GEMM takes the few-token calls (unless the sweep timed cuBLAS faster for the shape) and
    every call cuBLAS cannot run (K or N not a multiple of 16, such as Air's dense down at TP 8 with
    K = 1368; other output dtypes), cuBLAS the rest; the reference twin only off Hopper."""
    return _channel_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def _channel_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None, out_dtype: torch.dtype, unsummed: bool = False) -> torch.Tensor:
    """`fp8_linear`'s choice of GEMM; unsummed: the Triton GEMM may hand on its split-K slices."""
    if _triton_fits(x_q, x_scale, w_q, w_scale) and (
            _few_token_triton(x_q.shape[0], *w_q.shape, w_q, w_scale)
            or not scaled_mm_fits(x_q, x_scale, w_q, w_scale, bias, out_dtype)):
        from common.ops import triton_fp8_gemm  # imports triton: only where CUDA runs

        if unsummed:
            return triton_fp8_gemm.fp8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype, 0, unsummed=True)
        return triton_fp8_gemm.fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    return scaled_mm_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def _few_token_triton(m: int, n: int, k: int, w_q: torch.Tensor, w_scale: torch.Tensor) -> bool:
    """Few tokens where the sweep did not time cuBLAS faster (the caller checks the Triton GEMM fits)."""
    if m > SMALL_M:
        return False
    from common.ops import triton_fp8_gemm  # imports triton: only where CUDA runs

    return not triton_fp8_gemm.cublas_measured_faster(m, n, k, w_q.device)


def _triton_fits(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> bool:
    return (x_q.dtype == torch.float8_e4m3fn and _row_scale(x_scale, x_q.shape[0])
            and _triton_fits_weight(w_q, w_scale))


def _triton_fits_weight(w_q: torch.Tensor, w_scale: torch.Tensor) -> bool:
    """The weight side of the Triton channel GEMM's needs: Hopper or newer, E4M3, [N,1] fp32 scales."""
    return (w_q.device.type == "cuda" and _has_fp8_tensor_cores(w_q.device.index or 0)
            and w_q.dtype == torch.float8_e4m3fn and _row_scale(w_scale, w_q.shape[0]))


def scaled_mm_linear(
    x_q: torch.Tensor,  # [T,K] e4m3
    x_scale: torch.Tensor,  # [T,1] fp32
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # [N,1] fp32
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """The cuBLAS path alone (the reference twin where `scaled_mm_fits` says cuBLAS cannot run it)."""
    if not scaled_mm_fits(x_q, x_scale, w_q, w_scale, bias, out_dtype):
        return reference.fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    # w_q.t() is the column-major [K,N] operand cuBLAS wants, without a copy; w_scale.t() is [1,N]
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.t(), bias=bias,
                            out_dtype=out_dtype, use_fast_accum=x_q.shape[0] >= FAST_ACCUM_ROWS)


# Up to this many tokens a linear whose input arrives unquantised (o_proj's, after attention) is
# quantised inside the few-token Triton GEMM (its A_QUANT) instead of by one more launch. Off (0): on
# Air at full depth on an H100 the one-token decode step did not move and the 4-token EAGLE verify
# lost ~3 % (each program reads the whole row again for its amax: 12288 values, four rows at 4 tokens);
# alone in a graph that GEMM runs 1.04x the quantiser + GEMM at o_proj's one-token shape and 11x at 4
# tokens (docs/performance.md §7s).
QUANT_IN_GEMM_ROWS = 0


def _quant_in_gemm(m: int, n: int, k: int, w_q: torch.Tensor, w_scale: torch.Tensor, block: int) -> bool:
    """Whether the in-GEMM quantisation serves this call: few tokens, on the Triton GEMM the quantised
    call would take (block scales: always; channel: where `fp8_linear` picks it)."""
    if not 0 < m <= QUANT_IN_GEMM_ROWS or w_q.dtype != torch.float8_e4m3fn:
        return False
    return bool(block) or _few_token_channel_triton(m, n, k, w_q, w_scale)


def _few_token_channel_triton(m: int, n: int, k: int, w_q: torch.Tensor, w_scale: torch.Tensor) -> bool:
    """Whether `fp8_linear` would run this channel call of an [N,K] weight on the few-token Triton GEMM."""
    return _triton_fits_weight(w_q, w_scale) and _few_token_triton(m, n, k, w_q, w_scale)


def fp8_linear_dynamic(
    x: torch.Tensor,  # [T,K] bf16 | fp16 | fp32
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # block 0: [N,1]; b: [ceil(N/b), K/b] fp32
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype = torch.bfloat16,
    block: int = 0,
    unsummed: bool = False,
    x_amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """reference.fp8_linear_dynamic on the GPU: the Triton quantiser, then `fp8_linear` (as above) or
    the block GEMM; up to QUANT_IN_GEMM_ROWS tokens, the Triton GEMM quantising x as it loads it (the
    quantiser's codes and scales, one launch); with x's partial row amaxes (x_amax, channel scales)
    where `fp8_linear` would take the few-token Triton GEMM, that GEMM quantises x from them. unsummed
    (no bias): a split-K Triton GEMM returns its fp32 slices [T,S,N] without the reduce launch; every
    other path its [T,N] result."""
    from common.ops import triton_fp8, triton_fp8_gemm  # import triton: only where CUDA runs

    m, (n, k) = x.shape[0], w_q.shape
    unsummed = unsummed and bias is None
    if x_amax is not None and not block and _few_token_channel_triton(m, n, k, w_q, w_scale):
        return triton_fp8_gemm.fp8_gemm(x, None, w_q, w_scale, bias, out_dtype, 0, unsummed=unsummed, x_amax=x_amax)
    if _quant_in_gemm(m, n, k, w_q, w_scale, block):
        return triton_fp8_gemm.fp8_gemm(x, None, w_q, w_scale, bias, out_dtype, block, unsummed=unsummed)
    if block:
        x_q, x_scale = triton_fp8.quant_fp8_per_group(x, block)
        return triton_fp8_gemm.fp8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype, block, unsummed=unsummed)
    x_q, x_scale = triton_fp8.quant_fp8_per_token(x)
    return _channel_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype, unsummed)


__all__ = ["QUANT_IN_GEMM_ROWS", "SMALL_M", "fp8_linear", "fp8_linear_dynamic", "scaled_mm_fits", "scaled_mm_linear"]
