"""Weight prefetch ahead of a GEMM, on a side stream, while the kernels before it leave HBM idle.

At a few tokens the attention block is a chain of latency-bound kernels between two weight streams:
after qkv_proj come RoPE + the K/V store, the paged attention over a short KV, its split merge and the
quantiser, ~15 µs a layer on an H100 in which the memory system reads a few MB of KV. o_proj then
streams its whole weight (50 MB on GLM-4.5-Air in FP8). `prefetch_ahead` forks a side stream off the
current one right after qkv_proj and asks L2 for the tail of each of o_proj's weight rows there
(PTX prefetch.global.L2 through `pdl.prefetch_rows`), so the attention chain and the prefetch run
side by side and o_proj finds part of its weight in L2. The few-token GEMM's own prefetch before its
PDL wait (`pdl.PREFETCH_BYTES`) covers the programs it launches first, the first K slices of every
row; the side stream takes the last columns of every row, the part that GEMM reads last.

Weights are never written by a forward, so nothing a kernel computes can change; the side stream is
joined back into the forward's stream at the end of the model's forward (`join_ahead`), which CUDA
graph capture requires of every forked stream. Only batches of at most AHEAD_MAX_TOKENS tokens fork
(a longer attention streams enough KV through L2 to evict what was asked for). AHEAD_BYTES (a
layer, GLMSERVE_AHEAD_MB; 0: off) is kept under L2's 50 MB on Hopper.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from common.ops.pdl import prefetch_rows

AHEAD_BYTES = int(float(os.environ.get("GLMSERVE_AHEAD_MB", "0")) * 1e6)
AHEAD_MAX_TOKENS = 4
_ROWS = 64  # weight rows a program asks for
_LINE = 128  # bytes of an L2 line

_side: dict[int, torch.cuda.Stream] = {}
_pending: set[int] = set()  # devices whose side stream has work not yet joined


@triton.jit
def _prefetch_tail_kernel(w_ptr, n_rows, row_stride, k_lo, k_hi, ROWS: tl.constexpr):
    """Ask L2 for bytes [k_lo, k_hi) of ROWS weight rows a program; nothing is loaded or stored."""
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    prefetch_rows(w_ptr, tl.minimum(rows, n_rows - 1), row_stride, k_lo, k_hi)


def tail_columns(rows: int, row_bytes: int, budget: int) -> tuple[int, int]:
    """Byte range [lo, row_bytes) of each row to prefetch: the last whole L2 lines of every row that
    fit `budget` bytes over all `rows` (at least one line a row, at most the whole row)."""
    width = max(_LINE, budget // rows // _LINE * _LINE)
    return max(0, row_bytes - width), row_bytes


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _side:
        _side[index] = torch.cuda.Stream(device=index)
    return _side[index]


def prefetch_ahead(weight: torch.Tensor, tokens: int) -> None:
    """Fork the side stream off the current one here and ask L2 for the tail of `weight`'s rows
    ([N,K], K contiguous) there, when this batch is small enough and a budget is set."""
    if AHEAD_BYTES <= 0 or tokens > AHEAD_MAX_TOKENS or weight.dim() != 2 or weight.stride(-1) != 1:
        return
    raw = weight.view(torch.uint8)  # [N, K * element size]: byte offsets
    n, row_bytes = raw.shape
    lo, hi = tail_columns(n, row_bytes, AHEAD_BYTES)
    current = torch.cuda.current_stream(weight.device)
    side = _side_stream(weight.device)
    side.wait_stream(current)
    with torch.cuda.stream(side):
        _prefetch_tail_kernel[(triton.cdiv(n, _ROWS),)](raw, n, raw.stride(0), lo, hi, ROWS=_ROWS, num_warps=4)
    _pending.add(side.device_index)


def join_ahead(device: torch.device) -> None:
    """Make the current stream wait for the side stream's prefetches (none pending: nothing)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index in _pending:
        torch.cuda.current_stream(device).wait_stream(_side[index])
        _pending.discard(index)


__all__ = ["AHEAD_BYTES", "AHEAD_MAX_TOKENS", "join_ahead", "prefetch_ahead", "tail_columns"]
