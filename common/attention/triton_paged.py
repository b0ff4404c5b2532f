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
from common.ops.triton_norm import _cos_sin_row, _norm_rope_heads, qk_norm_rope_store

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


@triton.jit
def _rope_store_prologue(raw_ptr, q_ptr, kc_ptr, vc_ptr, pos_ptr, cs_ptr, qw_ptr, kw_ptr, slot_ptr, q0, i_first,
                         i_last, q_len, q_off, lo, hi, kv_head, HK, stride_rt, stride_rh, stride_qt, stride_qh,
                         stride_cp, stride_cs, stride_ch, stride_cos, eps, G: tl.constexpr, PAGE: tl.constexpr,
                         D: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr, HAS_QW: tl.constexpr,
                         HAS_KW: tl.constexpr, BHALF: tl.constexpr, BREST: tl.constexpr, BD: tl.constexpr,
                         BG: tl.constexpr):
    """The ROPE prologue of _paged_attn_kernel (its docstring): queries i_first..i_last's G heads of this
    KV head normed and rotated into q_ptr; the new k and v of this KV head stored for the new tokens
    whose logical slot (q_off + i) lies in [lo, hi); then a barrier."""
    dt = q_ptr.dtype.element_ty
    hq = G * HK
    for i in range(i_first, i_last + 1):
        t = (q0 + i).to(tl.int64)
        cos, sin = _cos_sin_row(cs_ptr, pos_ptr, t, stride_cos, dt, HALF, BHALF)
        _norm_rope_heads(raw_ptr + t * stride_rt, q_ptr + t * stride_qt, qw_ptr, kv_head * G + G, kv_head * G,
                         stride_rh, stride_qh, cos, sin, eps, D, HALF, REST, HAS_QW, BG, BHALF, BREST, False)
    d = tl.arange(0, BD)
    for i in range(tl.maximum(lo - q_off, 0), tl.minimum(hi - q_off, q_len)):  # new slots this program reads
        t = (q0 + i).to(tl.int64)
        slot = tl.load(slot_ptr + t)
        if slot >= 0:
            dst = (slot // PAGE) * stride_cp + (slot % PAGE) * stride_cs
            cos, sin = _cos_sin_row(cs_ptr, pos_ptr, t, stride_cos, dt, HALF, BHALF)
            # heads [kv_head, kv_head + 2) masked to the one: the helper's tiles are at least 2 heads
            _norm_rope_heads(raw_ptr + t * stride_rt + hq * stride_rh, kc_ptr + dst, kw_ptr, kv_head + 1, kv_head,
                             stride_rh, stride_ch, cos, sin, eps, D, HALF, REST, HAS_KW, 2, BHALF, BREST, False)
            v = tl.load(raw_ptr + t * stride_rt + (hq + HK + kv_head) * stride_rh + d, mask=d < D)
            tl.store(vc_ptr + dst + kv_head * stride_ch + d, v.to(vc_ptr.dtype.element_ty), mask=d < D)
    tl.debug_barrier()


@triton.jit(do_not_specialize=["stride_tb", "NUM_SPLITS"])
def _paged_attn_kernel(
    q_ptr, kc_ptr, vc_ptr, o_ptr, po_ptr, plse_ptr,
    qstart_ptr, prefix_ptr, seqlen_ptr, table_ptr, mask_ptr, mstart_ptr, scale_log2,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cp, stride_cs, stride_ch, stride_tb, NUM_SPLITS,
    G: tl.constexpr, PAGE: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
    SPLIT: tl.constexpr, HAS_MASK: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, PDL: tl.constexpr,
    raw_ptr=None, pos_ptr=None, cs_ptr=None, qw_ptr=None, kw_ptr=None, slot_ptr=None, stride_rt=0, stride_rh=0,
    stride_cos=0, eps=0.0, HK=1, ROPE: tl.constexpr = False, HALF: tl.constexpr = 1, REST: tl.constexpr = 1,
    BHALF: tl.constexpr = 1, BREST: tl.constexpr = 1, BG: tl.constexpr = 1, HAS_QW: tl.constexpr = False,
    HAS_KW: tl.constexpr = False,
):
    """grid (row blocks, B, HK * NUM_SPLITS). NUM_SPLITS is a runtime value (one compiled kernel for
    every batch size); SPLIT = NUM_SPLITS > 1 selects the partial-output epilogue.
    ROPE: the new tokens' q, k, v come unrotated in one row of raw_ptr each ([T, (HQ + 2 HK) * D], q
    heads then k then v, row stride stride_rt, head stride stride_rh). Before its loop the program
    norms and rotates its queries' q heads into q_ptr, and stores the new k (normed, rotated) and v of
    its KV head into the cache at slot_ptr[t] (a negative slot stores nothing) for each new token in
    its KV range: every program that reads a new slot has written it itself (copies by other programs
    are the same bits), so a barrier inside the program orders the stores before its loads. The
    arithmetic is `triton_norm.qk_norm_rope_store`'s (the same helper), so q, the cache and the
    output are those of the two launches."""
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
    if ROPE:
        _rope_store_prologue(raw_ptr, q_ptr, kc_ptr, vc_ptr, pos_ptr, cs_ptr, qw_ptr, kw_ptr, slot_ptr, q0,
                             (pid_m * BM) // G, i_last, q_len, q_off, lo, hi, kv_head, HK, stride_rt, stride_rh,
                             stride_qt, stride_qh, stride_cp, stride_cs, stride_ch, stride_cos, eps, G, PAGE, D,
                             HALF, REST, HAS_QW, HAS_KW, BHALF, BREST, BD, BG)
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :], mask=qm, other=0.0)
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
SMALL_QUERY_ROWS = 64  # rows a KV head (queries x group) up to which plan() takes the small-query tiles


def plan(num_seqs: int, kv_heads: int, group: int, max_q: int, num_sms: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, NUM_SPLITS) for a batch shape."""
    rows = max_q * group
    if rows > SMALL_QUERY_ROWS:
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


# Batches of up to this many queries a sequence (and small-query tiles) norm and rotate the new tokens'
# q and k and store their K/V inside the attention launch (`_rope_store_prologue`): one launch fewer
# a layer. 1, decode-shaped batches: on Air at full depth on an H100 the one-token decode step took
# 2.2 % less, 64 tokens 0.2 % less; with the 4-query verify on it too the EAGLE steps came out
# 1.6-1.7 % slower, inside their spread (docs/performance.md §7r). 0: `triton_norm.qk_norm_rope_store`'s
# launch first for every batch, as larger ones always take (variant rope-queries=Q).
ROPE_IN_ATTENTION_QUERIES = 1


def _one_qkv_row(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether q, k, v are the head-major q | k | v parts of one row per token (the qkv projection's
    output), which the ROPE prologue indexes as one [T, (Hq + 2 Hk) * D] tensor."""
    d, es = q.shape[2], q.element_size()
    return (q.stride(2) == k.stride(2) == v.stride(2) == 1 and q.stride(1) == k.stride(1) == v.stride(1) == d
            and (q.shape[0] == 1 or q.stride(0) == k.stride(0) == v.stride(0))  # (one token: any row stride)
            and q.dtype == k.dtype == v.dtype
            and k.data_ptr() == q.data_ptr() + q.shape[1] * d * es
            and v.data_ptr() == k.data_ptr() + k.shape[1] * d * es)


def rope_store_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,  # [T,Hq,D], [T,Hk,D] x 2: before norm and RoPE
    positions: torch.Tensor, cos_sin: torch.Tensor, rotary_dim: int, q_norm_w: torch.Tensor | None,
    k_norm_w: torch.Tensor | None, eps: float, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch,
    scale: float, amax: torch.Tensor | None = None,
) -> torch.Tensor:  # [T,Hq,D]
    """`common.attention.rope_store_attention` (qk_norm_rope_store at batch.out_slots, then
    paged_attention). Batches of up to ROPE_IN_ATTENTION_QUERIES queries a sequence on small-query
    tiles whose q, k, v are one qkv row: one attention launch, the new q in a fresh tensor (q itself
    not written). The rest: the two launches."""
    n_tok, hq, d = q.shape
    hk = k.shape[1]
    if not (n_tok and batch.max_query_len <= ROPE_IN_ATTENTION_QUERIES
            and batch.max_query_len * (hq // hk) <= SMALL_QUERY_ROWS
            and _one_qkv_row(q, k, v) and cos_sin.stride(-1) == 1):
        q = qk_norm_rope_store(q, k, v, positions, cos_sin, rotary_dim, q_norm_w, k_norm_w, eps, k_cache, v_cache,
                               batch.out_slots)
        return paged_attention(q, k_cache, v_cache, batch, scale, amax)
    half, rest = rotary_dim // 2, d - rotary_dim
    rope = {"raw_ptr": q, "pos_ptr": positions, "cs_ptr": cos_sin, "slot_ptr": batch.out_slots,
            "qw_ptr": q if q_norm_w is None else q_norm_w, "kw_ptr": q if k_norm_w is None else k_norm_w,
            "stride_rt": q.stride(0), "stride_rh": q.stride(1), "stride_cos": cos_sin.stride(0), "eps": eps, "HK": hk,
            "ROPE": True, "HALF": half, "REST": rest, "BHALF": triton.next_power_of_2(max(half, 1)),
            "BREST": triton.next_power_of_2(max(rest, 1)), "BG": triton.next_power_of_2(hq // hk),
            "HAS_QW": q_norm_w is not None, "HAS_KW": k_norm_w is not None}
    qo = torch.empty((n_tok, hq, d), dtype=q.dtype, device=q.device)
    return paged_attention_splits(qo, k_cache, v_cache, batch, scale, None, amax, rope)


def paged_attention_splits(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float,
    num_splits: int | None,  # None: plan(); tests and benchmarks force split-K counts
    amax: torch.Tensor | None = None,
    rope: dict | None = None,  # rope_store_attention's prologue arguments (q: where the new q goes)
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
        BM=bm, BN=bn, num_warps=warps, num_stages=stages, **pdl_kwargs(q.device), **(rope or {}),
    )
    if splits > 1:
        amax_args = {} if amax is None else {"amax_ptr": amax, "AMAX": True}
        _merge_splits_kernel[(n_tok, hq)](po, plse, out, hq, out.stride(0), out.stride(1), splits,
                                          NS_PAD=triton.next_power_of_2(splits), D=d,
                                          BD=bd, num_warps=4, **pdl_kwargs(q.device), **amax_args)
    elif amax is not None:
        head_amax(out, amax)
    return out


__all__ = ["paged_attention", "paged_attention_splits", "plan", "rope_store_attention", "sdpa_prefill"]
