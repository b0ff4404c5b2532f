"""Router logits for many tokens on the tensor cores at fp32-GEMM accuracy.

`router_logits_mma(x[T,H] bf16, w[E,H] fp32) -> [T,E] fp32` computes x @ w^T. The fp32 reference
(`F.linear(x.float(), w)`) first copies x to fp32 and then runs an FFMA GEMM on the CUDA cores;
here every fp32 weight value is split exactly into three bf16 parts, hi + mid + lo == w, each
holding the next 8 significant bits (exact down to |w| ~ 1e-33, below which lo would need bf16
subnormals finer than they go). x is bf16 already, so every product x * part is exact in fp32,
and three tensor-core dots give the fp32 GEMM's result to its rounding. The split runs in
registers on each loaded fp32 w tile (the weights stay as they are; no bf16 copies).

Tiling: experts are the MMA's M dimension (the parts are made in registers, and Hopper's wgmma
takes its A operand from registers) and tokens its N dimension (x tiles go to shared memory as
the B operand); E is covered by BE-row blocks, masked at the edge. Programs cover (expert blocks,
token blocks, K splits); the K splits fill the GPU when E/BE x T/BT alone would not, each writes
partial sums [S,T,E] fp32, and one torch.sum over dim 0 adds them (a fixed order: deterministic,
no atomics).

The CPU interpreter runs this kernel once taught bf16 dots (tests/common/test_router_interpret.py).
fp16 x would need fp16 parts, whose 5-bit exponent sends mid/lo of typical router weights (~1e-2)
into subnormals: fp16 x, like fp32 x or a non-fp32 w, goes to F.linear.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.ops.moe_configs import num_sms
from common.ops.pdl import pdl_kwargs, pdl_start


@triton.jit
def _split3(w):
    """fp32 w -> (hi, mid, lo) bf16 with hi + mid + lo == w exactly. Each part is the top 8
    significant bits of what is left (truncation: bit masks and shifts, full-rate integer ops,
    where three cvt.rn.bf16.f32 per value made the whole kernel ~10% slower); both differences
    are exact in fp32, and lo has at most 8 significant bits left."""
    wb = w.to(tl.uint32, bitcast=True)
    r = w - (wb & 0xFFFF0000).to(tl.float32, bitcast=True)
    rb = r.to(tl.uint32, bitcast=True)
    lb = (r - (rb & 0xFFFF0000).to(tl.float32, bitcast=True)).to(tl.uint32, bitcast=True)
    hi = (wb >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    mid = (rb >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    lo = (lb >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return hi, mid, lo


@triton.jit(do_not_specialize=["T"])
def _router_mma_kernel(
    x_ptr, w_ptr, out_ptr, T, E, H, K_SPLIT, stride_x, stride_w, stride_os, stride_ot,
    BE: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, EVEN_K: tl.constexpr, PDL: tl.constexpr,
):
    """grid (cdiv(E, BE), cdiv(T, BT), S): out[s, t, e] = sum of x[t,k] * w[e,k] over split s's
    K_SPLIT-wide slice of H, for a BE x BT tile of (experts, tokens)."""
    pdl_start(PDL)
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    t = tl.program_id(1) * BT + tl.arange(0, BT)
    k = tl.arange(0, BK)
    em = e < E
    tm = t < T
    k_lo = tl.program_id(2) * K_SPLIT
    k_hi = tl.minimum(k_lo + K_SPLIT, H)
    w_ptrs = w_ptr + e[:, None].to(tl.int64) * stride_w + (k_lo + k)[None, :]  # [BE,BK]
    x_ptrs = x_ptr + t[:, None].to(tl.int64) * stride_x + (k_lo + k)[None, :]  # [BT,BK]
    acc = tl.zeros((BE, BT), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BK):
        if EVEN_K:  # H % BK == 0 and K_SPLIT % BK == 0: no tile crosses k_hi
            wt = tl.load(w_ptrs, mask=em[:, None], other=0.0)
            xt = tl.load(x_ptrs, mask=tm[:, None], other=0.0)
        else:
            km = k0 + k < k_hi
            wt = tl.load(w_ptrs, mask=em[:, None] & km[None, :], other=0.0)
            xt = tl.load(x_ptrs, mask=tm[:, None] & km[None, :], other=0.0)
        hi, mid, lo = _split3(wt)
        xt = tl.trans(xt)  # [BK,BT]
        # a fresh tensor-core accumulator per BK step, added to acc on the CUDA cores: the tensor
        # cores' fp32 accumulation is not round-to-nearest, and along one long chain its error grew
        # linearly with K (1.7e-5 at K = 5120 on the H100, 4e-7 for the FFMA GEMM; 1.2e-7 this way)
        acc += tl.dot(hi, xt, tl.dot(mid, xt, tl.dot(lo, xt)))
        w_ptrs += BK
        x_ptrs += BK
    out = out_ptr + tl.program_id(2).to(tl.int64) * stride_os + t[None, :].to(tl.int64) * stride_ot
    tl.store(out + e[:, None], acc, mask=em[:, None] & tm[None, :])


@triton.jit
def _split_kernel(w_ptr, hi_ptr, mid_ptr, lo_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < N
    hi, mid, lo = _split3(tl.load(w_ptr + offs, mask=m, other=0.0))
    tl.store(hi_ptr + offs, hi, mask=m)
    tl.store(mid_ptr + offs, mid, mask=m)
    tl.store(lo_ptr + offs, lo, mask=m)


def split3(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kernel's in-register split of fp32 w as a standalone op (for tests): bf16 (hi, mid,
    lo), each of w's shape."""
    wf = w.contiguous().view(-1)
    parts = tuple(torch.empty(wf.shape, dtype=torch.bfloat16, device=w.device) for _ in range(3))
    if wf.numel():
        _split_kernel[(triton.cdiv(wf.numel(), 1024),)](wf, *parts, wf.numel(), BLOCK=1024)
    return tuple(p.view(w.shape) for p in parts)  # type: ignore[return-value]


def plan(n_tok: int, n_exp: int, hidden: int, num_sms: int) -> tuple[int, int, int, int, int, int]:
    """(BE, BT, BK, splits, num_warps, num_stages) for a shape. One warpgroup (64 experts) per
    program, two programs per SM (registers), BT grows with T, then K splits until there are
    about two programs per SM, each split keeping at least 4 BK steps. Rounding the split count
    down keeps the grid within one round of two per SM (a few programs left over for a second
    round cost ~15%). Chosen from a sweep on the H100; benchmarks/kernels/bench_router.py measures it."""
    be, bk = 64, 64
    bt = 16 if n_tok <= 64 else 64 if n_tok <= 512 else 128
    tiles = triton.cdiv(n_exp, be) * triton.cdiv(n_tok, bt)
    max_splits = max(1, triton.cdiv(hidden, bk) // 4)
    splits = max(1, min(max_splits, 2 * num_sms // tiles))
    return be, bt, bk, splits, 4, 3


def _router_mma(
    x: torch.Tensor, w: torch.Tensor, cfg: tuple[int, int, int, int, int, int] | None = None, partial: bool = False
) -> torch.Tensor:
    """router_logits_mma's kernel path (bf16 x, fp32 w), with an optional plan() override."""
    n_tok, hidden = x.shape
    n_exp = w.shape[0]
    if n_tok == 0:
        return torch.empty((1, 0, n_exp) if partial else (0, n_exp), dtype=torch.float32, device=x.device)
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    be, bt, bk, splits, warps, stages = cfg or plan(n_tok, n_exp, hidden, num_sms(x.device))
    # whole BK steps per split, and no more splits than that leaves non-empty
    k_split = triton.cdiv(triton.cdiv(hidden, splits), bk) * bk
    splits = triton.cdiv(hidden, k_split)
    out = torch.empty((splits, n_tok, n_exp), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n_exp, be), triton.cdiv(n_tok, bt), splits)
    _router_mma_kernel[grid](x, w, out, n_tok, n_exp, hidden, k_split, x.stride(0), w.stride(0),
                             out.stride(0), out.stride(1), BE=be, BT=bt, BK=bk, EVEN_K=hidden % bk == 0,
                             num_warps=warps, num_stages=stages, **pdl_kwargs(x.device))
    if partial:
        return out
    return out[0] if splits == 1 else out.sum(0)


def router_logits_mma(x: torch.Tensor, w: torch.Tensor, partial: bool = False) -> torch.Tensor:
    """x[T,H] bf16 times the fp32 router weight w[E,H]^T -> [T,E] fp32, as accurate as the fp32
    GEMM F.linear(x.float(), w) but on the bf16 tensor cores: three dots of x with the exact bf16
    split of w (hi + mid + lo == w), split-K over H so that any T fills the GPU, partial sums added
    in a fixed order. Other dtypes (fp16 or fp32 x, non-fp32 w) go to F.linear. partial: the
    split-K partial sums [S,T,E] instead, for a consumer that adds them as it loads them
    (grouped_topk), one launch fewer."""
    if x.dtype != torch.bfloat16 or w.dtype != torch.float32:
        out = torch.nn.functional.linear(x.float(), w.float())
        return out[None] if partial else out
    return _router_mma(x, w, partial=partial)
