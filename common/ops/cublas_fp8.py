"""CUDA twin of `reference.fp8_linear`: the FP8 GEMM through cuBLAS (`torch._scaled_mm`).

Why cuBLAS rather than a kernel of our own: `torch._scaled_mm` with row-wise scales (one per token
of x, one per output channel of w) is a maintained library GEMM that reaches Hopper's FP8 tensor
cores with the scales applied in its epilogue, so the dense FP8 path needs no kernel to tune or keep
up. Its limits decide where it runs, and `scaled_mm_fits` is the one place that says so: CUDA on
sm_90 or newer, E4M3 operands, fp32 scales shaped [T,1] and [N,1], a bf16 output (the only one
row-wise scaling serves), a bf16 bias or none, K and N multiples of 16, row-major operands on
16-byte boundaries. Every other call runs the reference twin, so results never depend on whether
the fast path was taken beyond accumulation order and the output's rounding.

Block FP8 (1 x 128 activation groups, 128 x 128 weight blocks) goes through the same call where
cuBLAS serves it (12.9+, sm_90: `block_scaled_mm_fits`); `triton_fp8_gemm.fp8_block_linear` asks
that rule first and runs its Triton kernel otherwise.
"""

from __future__ import annotations

import functools

import torch

from common.ops import reference

_ALIGN = 16  # elements (1-byte E4M3) and bytes


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
    """y[T,N] = (x_q * x_scale) @ (w_q * w_scale)^T (+ bias); fp32 accumulation, no fast accumulation."""
    if not scaled_mm_fits(x_q, x_scale, w_q, w_scale, bias, out_dtype):
        return reference.fp8_linear(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    # w_q.t() is the column-major [K,N] operand cuBLAS wants, without a copy; w_scale.t() is [1,N]
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale.t(), bias=bias,
                            out_dtype=out_dtype, use_fast_accum=False)


_CUBLAS_BLOCK = 128  # the only block size cuBLAS's block scaling takes
_BLOCK_K_ALIGN = 4 * _CUBLAS_BLOCK  # K/128 a multiple of 4: the weight-scale row stride every torch version accepts


@functools.cache
def block_scaled_mm_available(device_index: int) -> bool:
    """cuBLAS block scaling for FP8 (128 x 128 weight blocks). Off: on an H100 with torch 2.11 (CUDA 13)
    cuBLASLt answered CUBLAS_STATUS_NOT_SUPPORTED for every GLM shape (measured 2026-12-06), so the
    Triton kernel serves block FP8."""
    return False


def block_scaled_mm_fits(
    x_q: torch.Tensor,  # [T,K] e4m3
    x_scale: torch.Tensor,  # [T,K/128] fp32
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # [ceil(N/128), K/128] fp32
    bias: torch.Tensor | None,  # [N]
    out_dtype: torch.dtype,
    block: int,
) -> bool:
    """Whether `torch._scaled_mm` with block scales can run this call: the conditions of
    `scaled_mm_fits` with scales per 1 x 128 group of x and per 128 x 128 block of w (row-major as
    the checkpoint stores them), b = 128, K a multiple of 512, and no bias (the Triton kernel adds
    one in its epilogue; cuBLAS's bias epilogue under block scaling is not relied on)."""
    if x_q.device.type != "cuda" or block != _CUBLAS_BLOCK or not block_scaled_mm_available(x_q.device.index or 0):
        return False
    (n_tok, k), n_out = x_q.shape, w_q.shape[0]
    k_blocks = k // block
    return (
        x_q.dtype == w_q.dtype == torch.float8_e4m3fn
        and out_dtype == torch.bfloat16 and bias is None
        and n_tok > 0 and k % _BLOCK_K_ALIGN == 0 and n_out % _ALIGN == 0
        and _aligned_rows(x_q) and _aligned_rows(w_q)
        and x_scale.dtype == w_scale.dtype == torch.float32
        and tuple(x_scale.shape) == (n_tok, k_blocks)
        and tuple(w_scale.shape) == (-(-n_out // block), k_blocks) and w_scale.is_contiguous()
    )


def block_scaled_mm(
    x_q: torch.Tensor,  # [T,K] e4m3
    x_scale: torch.Tensor,  # [T,K/128] fp32
    w_q: torch.Tensor,  # [N,K] e4m3
    w_scale: torch.Tensor,  # [ceil(N/128), K/128] fp32
) -> torch.Tensor:
    """y[T,N] bf16 of the block-scaled FP8 GEMM through cuBLAS; call only where block_scaled_mm_fits."""
    # cuBLAS takes the group scales token-major ([T,K/128] with stride (1, T)): a copy of T*K/128
    # floats; the block scales as stored ([N/128,K/128] row-major, passed transposed like w_q)
    x_scale_t = x_scale.t().contiguous().t()
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale_t, scale_b=w_scale.t(), out_dtype=torch.bfloat16,
                            use_fast_accum=False)


__all__ = ["block_scaled_mm", "block_scaled_mm_available", "block_scaled_mm_fits", "fp8_linear", "scaled_mm_fits"]
