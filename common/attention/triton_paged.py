"""Triton paged attention over a ForwardBatch: decode, extend with a cached prefix, masked verify.

One kernel serves every batch shape. A program owns one sequence b, one KV head h, BLOCK_M
"rows" and one KV split. Rows pack (query i, group head g) as r = i * G + g, so the G query heads
that share KV head h read each K/V tile once (decode: 12 rows of 16; verify with 4 queries: 48 of
64; extend: 128 rows ~ 10 queries x 12 heads). Visibility follows common/forward/batch.py:
- no mask: query i (of q_b) sees logical slot n iff n <= seq_len - q_b + i (prefix and causal
  window in one formula);
- mask: slots < prefix_len are visible; slot n >= prefix_len is visible iff
  mask[mask_start[b] + i * (seq_len - prefix_len) + (n - prefix_len)].
KV tiles entirely visible to every row of the program skip the mask arithmetic.

Split-K (flash decoding): small-query batches (decode, verify, draft) that would not fill the GPU
split each sequence's KV range into NUM_SPLITS equal BLOCK_N-aligned parts; each writes a
normalised partial and its log-sum-exp (base 2), and a second kernel merges them. NUM_SPLITS is a
function of (num_seqs, kv heads, max query length, SM count) only, never of sequence lengths, and
no host value of seq_lens/prefix_lens is read, so decode and verify are CUDA-graph safe.

Long prefills go to cuDNN or FlashAttention through torch's scaled_dot_product_attention instead
(`sdpa_prefill`): a batch whose every sequence has at least SDPA_MIN_QUERY queries and no mask. Those
libraries' Hopper kernels (warp-specialised, TMA-fed) run causal attention at head 128 much nearer the
tensor cores' peak than this kernel's gathered loads do (`benchmarks/kernels/bench_prefill_attention.py`
measures both). Each sequence's K/V is gathered from its pages into contiguous [1, Hk, S, D] tensors
(a copy of 2 x S x Hk x D values, small next to the attention's FLOPs), queries attend causally
aligned to the end of the sequence (a cached prefix is wholly visible), GQA without expanding K/V.
Only those two backends are allowed (never the math one, which would materialise S x S scores); a
shape neither takes falls back to this kernel. GLMSERVE_SDPA_PREFILL=0 turns the path off.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

from common.attention.base import head_amax
from common.forward.batch import ForwardBatch
from common.ops.moe_configs import num_sms
from common.ops.pdl import pdl_kwargs, pdl_start

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64


@triton.jit
def _attn_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, tbl_ptr, n0, hi, kv_head, q_pos, prefix, window,
               mask_ptr, mrow, rmask, scale_log2, stride_cp, stride_cs, stride_ch,
               PAGE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BN: tl.constexpr,
               MASKED: tl.constexpr, HAS_MASK: tl.constexpr):
    """One KV tile [n0, n0+BN) of the online softmax. q [BM,BD]; acc [BM,BD] fp32; m_i, l_i [BM]."""
    n = n0 + tl.arange(0, BN)  # [BN] logical slots
    d = tl.arange(0, BD)
    nm = n < hi
    page = tl.load(tbl_ptr + n // PAGE, mask=nm, other=0).to(tl.int64)
    kv_off = page * stride_cp + (n % PAGE) * stride_cs + kv_head * stride_ch  # [BN]
    ld_mask = nm[:, None] & (d < D)[None, :]
    k = tl.load(kc_ptr + kv_off[:, None] + d[None, :], mask=ld_mask, other=0.0)  # [BN,BD]
    v = tl.load(vc_ptr + kv_off[:, None] + d[None, :], mask=ld_mask, other=0.0)
    s = tl.dot(q, tl.trans(k)) * scale_log2  # [BM,BN]
    if MASKED:
        if HAS_MASK:
            col = n - prefix  # [BN]
            inw = (col >= 0)[None, :] & nm[None, :] & rmask[:, None]
            bit = tl.load(mask_ptr + mrow[:, None] + col[None, :], mask=inw, other=0)
            vis = ((col < 0)[None, :] | (bit != 0)) & nm[None, :]
        else:
            vis = (n[None, :] <= q_pos[:, None]) & nm[None, :]
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, m_new, l_i


@triton.jit(do_not_specialize=["stride_tb", "NUM_SPLITS"])
def _paged_attn_kernel(
    q_ptr, kc_ptr, vc_ptr, o_ptr, po_ptr, plse_ptr,
    qstart_ptr, prefix_ptr, seqlen_ptr, table_ptr, mask_ptr, mstart_ptr, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cp, stride_cs, stride_ch, stride_tb, NUM_SPLITS,
    G: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    SPLIT: tl.constexpr, HAS_MASK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr,
):
    """grid (row blocks, B, HK * NUM_SPLITS). NUM_SPLITS is a runtime value (one compiled kernel for
    every batch size); SPLIT = NUM_SPLITS > 1 selects the partial-output epilogue."""
    pdl_start(PDL)
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest causal ranges first: a shorter tail
    b = tl.program_id(1)
    kv_head = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    q0 = tl.load(qstart_ptr + b)
    q_len = tl.load(qstart_ptr + b + 1) - q0
    if pid_m * BM >= q_len * G:
        return
    seq_len = tl.load(seqlen_ptr + b)
    prefix = tl.load(prefix_ptr + b)
    r = pid_m * BM + tl.arange(0, BM)
    i = r // G  # query index within the sequence
    head = kv_head * G + r % G
    rmask = i < q_len
    i_last = tl.minimum((pid_m * BM + BM - 1) // G, q_len - 1)
    q_off = seq_len - q_len  # slot of query 0
    q_pos = q_off + i  # causal limit per row
    d = tl.arange(0, BD)
    tok = (q0 + i).to(tl.int64)
    qm = rmask[:, None] & (d < D)[None, :]
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=qm, other=0.0)
    window = seq_len - prefix
    if HAS_MASK:
        hi = seq_len
        full = prefix  # slots before this are visible to every row
        mrow = tl.load(mstart_ptr + b) + i.to(tl.int64) * window
    else:
        hi = q_off + i_last + 1
        full = q_off + pid_m * BM // G + 1
        mrow = i.to(tl.int64)
    lo = 0
    if SPLIT:
        span = tl.cdiv(tl.cdiv(hi, NUM_SPLITS), BN) * BN
        lo = split * span
        hi = tl.minimum(hi, lo + span)
    mid = tl.maximum(lo, lo + (tl.minimum(full, hi) - lo) // BN * BN)
    acc = tl.zeros((BM, BD), dtype=tl.float32)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    tbl = table_ptr + b.to(tl.int64) * stride_tb
    for n0 in range(lo, mid, BN):
        acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, tbl, n0, hi, kv_head, q_pos, prefix,
                                   window, mask_ptr, mrow, rmask, scale_log2, stride_cp, stride_cs, stride_ch,
                                   PAGE, D, BD, BN, False, HAS_MASK)
    for n0 in range(mid, hi, BN):
        acc, m_i, l_i = _attn_tile(q, acc, m_i, l_i, kc_ptr, vc_ptr, tbl, n0, hi, kv_head, q_pos, prefix,
                                   window, mask_ptr, mrow, rmask, scale_log2, stride_cp, stride_cs, stride_ch,
                                   PAGE, D, BD, BN, True, HAS_MASK)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if not SPLIT:
        optr = o_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
        tl.store(optr, out.to(o_ptr.dtype.element_ty), mask=qm)
    else:
        hq = G * tl.num_programs(2) // NUM_SPLITS
        part = (tok * hq + head) * NUM_SPLITS + split  # [BM] index into [T, HQ, NUM_SPLITS]
        tl.store(po_ptr + part[:, None] * D + d[None, :], out, mask=qm)
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.log2(l_safe))
        tl.store(plse_ptr + part, lse, mask=rmask)


@triton.jit(do_not_specialize=["NUM_SPLITS"])
def _merge_splits_kernel(po_ptr, plse_ptr, o_ptr, HQ, stride_ot, stride_oh, NUM_SPLITS,
                         NS_PAD: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr,
                         amax_ptr=None, AMAX: tl.constexpr = False):
    """grid (T, HQ): o = sum_s 2^(lse_s - max) * o_s / sum_s 2^(lse_s - max). AMAX: also max |o| (as
    stored, in o's dtype) at amax_ptr [T, HQ] fp32, for the consumer's per-token quantiser."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    s = tl.arange(0, NS_PAD)
    d = tl.arange(0, BD)
    base = (t * HQ + h) * NUM_SPLITS
    lse = tl.load(plse_ptr + base + s, mask=s < NUM_SPLITS, other=float("-inf"))  # [NS_PAD]
    mx = tl.max(lse, axis=0)
    w = tl.exp2(lse - mx)
    po = tl.load(po_ptr + (base + s)[:, None] * D + d[None, :], mask=(s < NUM_SPLITS)[:, None] & (d < D)[None, :],
                 other=0.0)
    out = (tl.sum(po * w[:, None], axis=0) / tl.sum(w, axis=0)).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + t * stride_ot + h * stride_oh + d, out, mask=d < D)
    if AMAX:
        tl.store(amax_ptr + t * HQ + h, tl.max(tl.where(d < D, tl.abs(out.to(tl.float32)), 0.0), axis=0))


# Small-query tiles (H100, context 1024, `tune_attention --decode`): a decode row block of 16 with
# 64-slot K/V tiles, 4 warps and 2 stages; a verify (4 queries x 12 heads = 48 rows) in three 16-row
# blocks up to VERIFY_ROWS16_MAX sequences (the blocks of one KV head run together and re-read its
# K/V from L2) and in one 64-row block of 32-slot tiles above (64 sequences: 121.9 us against 129.6
# with 64-slot tiles, 138-216 with 8 warps or 32-row blocks); split-K only while a batch has fewer
# programs than SMs.
VERIFY_ROWS16_MAX = 32


def plan(num_seqs: int, kv_heads: int, group: int, max_q: int, num_sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, NUM_SPLITS) for a batch shape."""
    rows = max_q * group
    if rows > 64:
        return 128, 128, 8, 3, 1  # extend / prefill: compute-bound (benchmarks/kernels/tune_attention.py, H100)
    # decode, draft, verify: memory-bound, split KV to fill the GPU
    if rows <= 16:
        bm, bn, warps, stages = 16, 64, 4, 2
    elif num_seqs <= VERIFY_ROWS16_MAX:
        bm, bn, warps, stages = 16, 128, 4, 3
    else:
        bm, bn, warps, stages = triton.next_power_of_2(rows), 32, 4, 3
    programs = num_seqs * kv_heads * triton.cdiv(rows, bm)
    splits = 1 if programs >= num_sms else min(_MAX_SPLITS, triton.cdiv(2 * num_sms, programs))
    return bm, bn, warps, stages, splits


USE_SDPA_PREFILL = os.environ.get("GLMSERVE_SDPA_PREFILL", "1") != "0"
SDPA_MIN_QUERY = 1024  # queries per sequence from which sdpa_prefill serves a prefill batch
_SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
_sdpa_refused: set[tuple] = set()  # (q_len == seq_len, dtype, head dim, group) no allowed backend took


def sdpa_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
                 scale: float) -> torch.Tensor | None:
    """Causal attention of each sequence's queries through torch SDPA (cuDNN first, then flash), or
    None when the batch is not a long unmasked prefill or no allowed backend takes the shape."""
    if (not USE_SDPA_PREFILL or batch.mask is not None or not batch.num_seqs
            or min(batch.query_lens_host) < SDPA_MIN_QUERY):
        return None
    _, hq, d = q.shape
    page, hk = k_cache.shape[1], k_cache.shape[2]
    outs = []  # per sequence [q_b,Hq,D]: views of SDPA's token-major outputs
    start = 0
    for b, (q_len, seq_len) in enumerate(zip(batch.query_lens_host, batch.seq_lens_host)):
        kind = (q_len == seq_len, q.dtype, d, hq // hk)
        if kind in _sdpa_refused:
            return None
        n_pages = -(-seq_len // page)
        first = batch.run_start_host[b] if batch.run_start_host else -1
        if first >= 0:  # consecutive pages: the sequence's K/V is one slice of the pool, no copy
            k, v = k_cache[first:first + n_pages], v_cache[first:first + n_pages]
        else:
            pages = batch.page_table[b, :n_pages]
            k, v = k_cache.index_select(0, pages), v_cache.index_select(0, pages)
        k = k.reshape(-1, hk, d)[:seq_len].transpose(0, 1).unsqueeze(0)  # [1,Hk,S,D]
        v = v.reshape(-1, hk, d)[:seq_len].transpose(0, 1).unsqueeze(0)
        qs = q[start:start + q_len].transpose(0, 1).unsqueeze(0)  # [1,Hq,q,D]
        causal = {"is_causal": True} if q_len == seq_len else {"attn_mask": causal_lower_right(q_len, seq_len)}
        try:
            with sdpa_kernel(_SDPA_BACKENDS, set_priority=True):
                o = F.scaled_dot_product_attention(qs, k, v, scale=scale, enable_gqa=hq != hk, **causal)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # no allowed backend for this shape: the Triton kernel serves it from now on
            _sdpa_refused.add(kind)
            return None
        outs.append(o[0].transpose(0, 1))
        start += q_len
    # one sequence (a long prompt): SDPA's output as it is, no copy
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def paged_attention(
    q: torch.Tensor,  # [T,Hq,D]
    k_cache: torch.Tensor,  # [P,S,Hk,D]
    v_cache: torch.Tensor,  # [P,S,Hk,D]
    batch: ForwardBatch,
    scale: float,
    amax: torch.Tensor | None = None,  # [T,Hq] fp32, filled with each head's max |o|
) -> torch.Tensor:  # [T,Hq,D]
    """Attention of every query over its visible slots (see module docstring); kernel by batch shape.
    amax: the split merge writes it as it stores o; without a merge, one more launch."""
    out = sdpa_prefill(q, k_cache, v_cache, batch, scale)
    if out is None:
        out = paged_attention_splits(q, k_cache, v_cache, batch, scale, None, amax)
    elif amax is not None:
        head_amax(out, amax)
    return out


def paged_attention_splits(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float,
    num_splits: int | None,  # None: plan(); tests and benchmarks force split-K counts
    amax: torch.Tensor | None = None,
) -> torch.Tensor:
    n_tok, hq, d = q.shape
    hk = k_cache.shape[2]
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("paged_attention: k_cache and v_cache need the same strides and a contiguous head dim")
    group = hq // hk
    out = torch.empty((n_tok, hq, d), dtype=q.dtype, device=q.device)
    if n_tok == 0:
        return out
    num_seqs = batch.num_seqs
    max_q = batch.max_query_len
    bm, bn, warps, stages, splits = plan(num_seqs, hk, group, max_q, num_sms(q.device))
    if num_splits is not None:
        splits = num_splits
    bd = triton.next_power_of_2(d)
    has_mask = batch.mask is not None
    mask = batch.mask.view(torch.uint8) if has_mask else q
    mstart = batch.mask_start if has_mask else batch.query_start
    if splits > 1:
        po = torch.empty((n_tok, hq, splits, d), dtype=torch.float32, device=q.device)
        plse = torch.empty((n_tok, hq, splits), dtype=torch.float32, device=q.device)
    else:
        po = plse = out
    grid = (triton.cdiv(max_q * group, bm), num_seqs, hk * splits)
    _paged_attn_kernel[grid](
        q, k_cache, v_cache, out, po, plse,
        batch.query_start, batch.prefix_lens, batch.seq_lens, batch.page_table, mask, mstart,
        scale * _LOG2E, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), batch.page_table.stride(0), splits,
        G=group, PAGE=k_cache.shape[1], D=d, BD=bd, SPLIT=splits > 1, HAS_MASK=has_mask,
        BM=bm, BN=bn, num_warps=warps, num_stages=stages, **pdl_kwargs(q.device),
    )
    if splits > 1:
        amax_args = {} if amax is None else {"amax_ptr": amax, "AMAX": True}
        _merge_splits_kernel[(n_tok, hq)](po, plse, out, hq, out.stride(0), out.stride(1), splits,
                                          NS_PAD=triton.next_power_of_2(splits), D=d,
                                          BD=bd, num_warps=4, **pdl_kwargs(q.device), **amax_args)
    elif amax is not None:
        head_amax(out, amax)
    return out


__all__ = ["paged_attention", "paged_attention_splits", "plan", "sdpa_prefill"]
