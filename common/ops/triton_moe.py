"""Triton fused MoE: router top-k, expert alignment, grouped gate_up+SiLU GEMM, down GEMM, combine.

Pipeline of `fused_moe(x[T,H], w13[E,2I,H], w2[E,H,I], weights[T,k], ids[T,k])`:
1. align: the T*k (token, slot) assignments are bucketed by expert, each expert's bucket padded to
   a multiple of BLOCK_M. `sorted_ids[max_padded]` holds flat assignment indices t*k+j (sentinel
   T*k in padding) and `block_expert[max_blocks]` the expert of each BLOCK_M rows (-1: unused).
   Up to ALIGN_SORT_MAX assignments one kernel sorts them by (expert, index); more take a count
   kernel, then the scatter kernel, each of whose programs ranks its chunk with one sort. One token
   needs no alignment (its k experts are distinct): each assignment is its own block (DIRECT).
2. gate_up: rows x[t] of each block times w13[e]^T, both halves in one program, epilogue
   silu(gate)*up -> act[T*k, I] (row = flat assignment index).
3. down: act rows times w2[e]^T, scaled by the routing weight -> y[T*k, H].
4. combine: out[t] = sum_j y[t*k+j] in fp32, cast once (deterministic; no atomics).
Each GEMM program owns one [BLOCK_M, BLOCK_N] tile of one expert's block. A rows are gathered by
pointer loads; weight tiles come by pointer loads or, with a table entry's "tma" on Hopper, through
the tensor memory accelerator. On Hopper every kernel here is launched as a programmatic dependent
of the kernel before it (PDL, common/ops/pdl.py): each starts while its predecessor drains and reads
nothing before its in-kernel wait.
Grid sizes depend only on host-known shapes (T, k, E, config), never on routing, so the whole
pipeline is CUDA-graph safe; token-count-dependent ints are not specialised (no recompiles as T
changes: one kernel per config). Block configs: common/ops/moe_configs (tuned tables written by
benchmarks/kernels/tune_moe.py, heuristic fallback). The torch twins of grouped_topk,
router_logits and fused_moe are in common/ops/reference.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.ops.moe_configs import CONFIG_DIR, config_name, default_config, get_config
from common.ops.pdl import pdl_enabled, pdl_kwargs, pdl_start
from common.ops.triton_router import router_logits_mma

_SUB = 32  # assignments ranked per step by the scatter kernel's one-hot path (one-hot [_SUB, E_PAD])
ALIGN_CHUNK = 256  # assignments per program of the multi-chunk alignment (benchmarks/kernels/bench_align.py)
ALIGN_MAX_CHUNKS = 128


@triton.jit
def _group_limited(c, e, EPG: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, G_PAD: tl.constexpr):
    """c [BT,E_PAD] bias-corrected scores (-inf past E), e the expert index [E_PAD]: c with -inf outside
    each token's TOPK_GROUP best groups of EPG experts (a group's score: its two best experts' sum)."""
    BT: tl.constexpr = c.shape[0]
    g = tl.arange(0, G_PAD)  # [G_PAD]
    in_g = (e // EPG)[None, :] == g[:, None]  # [G_PAD,E_PAD]
    cg = tl.where(in_g[None, :, :], c[:, None, :], float("-inf"))  # [BT,G_PAD,E_PAD]
    first = tl.argmax(cg, axis=2)  # [BT,G_PAD]
    m1 = tl.max(cg, axis=2)
    m2 = tl.max(tl.where(e[None, None, :] == first[:, :, None], float("-inf"), cg), axis=2)
    gs = tl.where((g < N_GROUP)[None, :], m1 + m2, float("-inf"))  # [BT,G_PAD]
    keep = tl.zeros((BT, G_PAD), dtype=tl.int32)
    for _ in tl.static_range(TOPK_GROUP):
        best = tl.argmax(gs, axis=1)  # [BT]
        hit = g[None, :] == best[:, None]
        keep = tl.where(hit, 1, keep)
        gs = tl.where(hit, float("-inf"), gs)
    allowed = tl.max((in_g[None, :, :] & (keep[:, :, None] > 0)).to(tl.int32), axis=1)  # [BT,E_PAD]
    return tl.where(allowed > 0, c, float("-inf"))


@triton.jit
def route_slot(logit_ptr, bias_ptr, stride_s, E, slot, scaling, EPG: tl.constexpr, N_GROUP: tl.constexpr,
               TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr, RENORM: tl.constexpr, E_PAD: tl.constexpr,
               G_PAD: tl.constexpr, SPLITS: tl.constexpr):
    """One token's routing as `_grouped_topk_kernel` does it, for one of its slots: (expert id, routing
    weight) of `slot`; slots from TOPK on are the shared experts E.. with weight 1. The logits are
    the sum of SPLITS terms (stride_s apart, added in index order). The slot's expert is the one
    ranked `slot` by bias-corrected score, ties to the lower id as argmax takes them: every expert's
    rank counts the experts ahead of it, one [E_PAD, E_PAD] comparison and one sum, where the top-k
    kernel takes TOPK dependent argmax steps. The weight's renormalising sum runs over the selected
    scores in expert order (the top-k kernel's in rank order: the two may differ in the last bit)."""
    e = tl.arange(0, E_PAD)  # [E_PAD]
    em = e < E
    z = tl.load(logit_ptr + e, mask=em, other=0.0).to(tl.float32)
    for i in tl.static_range(1, SPLITS):
        z += tl.load(logit_ptr + i * stride_s + e, mask=em, other=0.0).to(tl.float32)
    s = tl.sigmoid(z)
    c = tl.where(em, s + tl.load(bias_ptr + e, mask=em, other=0.0), float("-inf"))
    if N_GROUP > 1:
        c = tl.reshape(_group_limited(tl.reshape(c, (1, E_PAD)), e, EPG, N_GROUP, TOPK_GROUP, G_PAD), (E_PAD,))
    ahead = (c[None, :] > c[:, None]) | ((c[None, :] == c[:, None]) & (e[None, :] < e[:, None]))  # [E_PAD,E_PAD]
    rank = tl.sum(ahead.to(tl.int32), axis=1)  # [E_PAD]
    hit = (rank == slot) & em
    expert = tl.sum(tl.where(hit, e, 0))
    w = tl.sum(tl.where(hit, s, 0.0))
    if RENORM:
        w = w / (tl.sum(tl.where((rank < TOPK) & em, s, 0.0)) + 1e-20)
    routed = slot < TOPK
    return tl.where(routed, expert, E + slot - TOPK), tl.where(routed, w * scaling, 1.0)


@triton.jit(do_not_specialize=["T"])
def _grouped_topk_kernel(
    logit_ptr, bias_ptr, w_ptr, id_ptr, T, E, stride_s, stride_l, scaling,
    EPG: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, TOPK: tl.constexpr,
    RENORM: tl.constexpr, BT: tl.constexpr, E_PAD: tl.constexpr, G_PAD: tl.constexpr,
    K_PAD: tl.constexpr, SHARED: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
):
    """BT tokens per program: the logits (the sum of SPLITS partial terms, added in index order),
    sigmoid scores, bias-corrected group-limited top-k, weights from the unbiased scores
    (renormalised, scaled); then SHARED columns: ids E.., weight 1."""
    pdl_start(PDL)
    t = tl.program_id(0) * BT + tl.arange(0, BT)  # [BT]
    e = tl.arange(0, E_PAD)  # [E_PAD]
    tm = t < T
    em = e < E
    at = logit_ptr + t[:, None].to(tl.int64) * stride_l + e[None, :]
    z = tl.load(at, mask=tm[:, None] & em[None, :], other=0.0).to(tl.float32)
    for i in tl.static_range(1, SPLITS):
        z += tl.load(at + i * stride_s, mask=tm[:, None] & em[None, :], other=0.0).to(tl.float32)
    s = tl.sigmoid(z)  # [BT,E_PAD]
    c = s + tl.load(bias_ptr + e, mask=em, other=0.0)[None, :]
    c = tl.where(em[None, :], c, float("-inf"))
    if N_GROUP > 1:
        c = _group_limited(c, e, EPG, N_GROUP, TOPK_GROUP, G_PAD)
    kk = tl.arange(0, K_PAD)  # [K_PAD]
    ids = tl.zeros((BT, K_PAD), dtype=tl.int32)
    ws = tl.zeros((BT, K_PAD), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        best = tl.argmax(c, axis=1)  # [BT]
        hit = e[None, :] == best[:, None]
        wj = tl.sum(tl.where(hit, s, 0.0), axis=1)  # [BT]
        ids = tl.where(kk[None, :] == j, best[:, None], ids)
        ws = tl.where(kk[None, :] == j, wj[:, None], ws)
        c = tl.where(hit, float("-inf"), c)
    if RENORM:
        ws = ws / (tl.sum(ws, axis=1)[:, None] + 1e-20)
    ws = ws * scaling
    shared = (kk >= TOPK)[None, :]
    ws = tl.where(shared, 1.0, ws)
    ids = tl.where(shared, E + kk[None, :] - TOPK, ids)
    out = t[:, None] * (TOPK + SHARED) + kk[None, :]
    om = tm[:, None] & (kk < TOPK + SHARED)[None, :]
    tl.store(w_ptr + out, ws, mask=om)
    tl.store(id_ptr + out, ids, mask=om)


def grouped_topk(
    router_logits: torch.Tensor,  # [T,E] fp32, or [S,T,E] partial terms that sum to them
    correction_bias: torch.Tensor,  # [E] fp32
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    scaling: float,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights[T,k+s] fp32, ids[T,k+s] int32), routed ids in descending score order, then the s =
    num_shared shared experts (ids E.., weight 1)."""
    logits = router_logits if router_logits.dim() == 3 else router_logits[None]
    splits, n_tok, n_exp = logits.shape
    width = top_k + num_shared
    weights = torch.empty((n_tok, width), dtype=torch.float32, device=logits.device)
    ids = torch.empty((n_tok, width), dtype=torch.int32, device=logits.device)
    if n_tok == 0:
        return weights, ids
    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    bt = 1 if n_group > 1 else 4
    _grouped_topk_kernel[(triton.cdiv(n_tok, bt),)](
        logits, correction_bias.float().contiguous(), weights, ids, n_tok, n_exp, logits.stride(0), logits.stride(1),
        float(scaling), EPG=n_exp // n_group, N_GROUP=n_group, TOPK_GROUP=topk_group, TOPK=top_k,
        RENORM=renormalize, BT=bt, E_PAD=triton.next_power_of_2(n_exp),
        G_PAD=triton.next_power_of_2(n_group), K_PAD=triton.next_power_of_2(width), SHARED=num_shared,
        SPLITS=splits, num_warps=4, **pdl_kwargs(logits.device),
    )
    return weights, ids


@triton.jit(do_not_specialize=["T"])
def _router_kernel(x_ptr, w_ptr, out_ptr, T, E, H, stride_x, stride_w, stride_o,
                   BT: tl.constexpr, BE: tl.constexpr, BK: tl.constexpr, PDL: tl.constexpr):
    """grid (cdiv(E, BE),): logits[t, e] = sum_h fp32(x[t,h]) * w[e,h] for all T (<= BT) tokens;
    each program streams its BE router rows once."""
    pdl_start(PDL)
    e = tl.program_id(0) * BE + tl.arange(0, BE)
    t = tl.arange(0, BT)
    k = tl.arange(0, BK)
    em = e < E
    tm = t < T
    acc = tl.zeros((BT, BE), dtype=tl.float32)
    for k0 in range(0, H, BK):
        km = k0 + k < H
        w = tl.load(w_ptr + e[:, None].to(tl.int64) * stride_w + k0 + k[None, :], mask=em[:, None] & km[None, :],
                    other=0.0)  # [BE,BK]
        for i in tl.static_range(BT):
            xi = tl.load(x_ptr + i * stride_x + k0 + k, mask=km & (i < T), other=0.0).to(tl.float32)  # [BK]
            acc += tl.where(t[:, None] == i, tl.sum(w * xi[None, :], axis=1)[None, :], 0.0)
    tl.store(out_ptr + t[:, None] * stride_o + e[None, :], acc, mask=tm[:, None] & em[None, :])


ROUTER_MAX_TOKENS = 4  # above this: triton_router's tensor-core kernel


def router_logits(x: torch.Tensor, w: torch.Tensor, partial: bool = False) -> torch.Tensor:
    """x [T,H] (bf16) times the fp32 router weight [E,H]^T -> [T,E] fp32. Few tokens: one Triton
    kernel reading x in its own dtype (no fp32 copy of x, no cuBLAS GEMV + reduce pair); more: the
    exact three-way bf16 split of w on the tensor cores (triton_router; F.linear for other dtypes).
    partial: [S,T,E] terms that sum to the logits (S > 1 only for the split-K tensor-core kernel),
    which grouped_topk adds as it loads them."""
    n_tok, hidden = x.shape
    if n_tok > ROUTER_MAX_TOKENS:
        return router_logits_mma(x, w, partial)
    if w.dtype != torch.float32 or n_tok == 0:
        out = torch.nn.functional.linear(x.float(), w)
        return out[None] if partial else out
    x = x if x.stride(-1) == 1 else x.contiguous()
    w = w if w.stride(-1) == 1 else w.contiguous()
    n_exp = w.shape[0]
    out = torch.empty((n_tok, n_exp), dtype=torch.float32, device=x.device)
    # one router row per program, the whole hidden dim in one load: E programs of one latency each
    # (4 rows x 512-wide steps took 10 us per layer on the H100, latency-bound)
    bk = min(8192, triton.next_power_of_2(hidden))
    _router_kernel[(n_exp,)](x, w, out, n_tok, n_exp, hidden, x.stride(0), w.stride(0), out.stride(0),
                             BT=triton.next_power_of_2(n_tok), BE=1, BK=bk, num_warps=4 if bk <= 4096 else 8,
                             **pdl_kwargs(x.device))
    return out[None] if partial else out


@triton.jit(do_not_specialize=["NUMEL", "CHUNK"])
def _align_count_kernel(id_ptr, count_ptr, NUMEL, CHUNK, E, E_PAD: tl.constexpr, SUB: tl.constexpr,
                        PDL: tl.constexpr):
    """grid (NC,): count_ptr[pid, e] = how many of assignments [pid*CHUNK, +CHUNK) go to e."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    acc = tl.zeros((E_PAD,), dtype=tl.int32)
    for s in range(0, CHUNK, SUB):
        i = pid * CHUNK + s + tl.arange(0, SUB)
        m = (i < NUMEL) & (s + tl.arange(0, SUB) < CHUNK)
        acc += tl.histogram(tl.load(id_ptr + i, mask=m, other=0), E_PAD, mask=m)
    tl.store(count_ptr + pid * E_PAD + tl.arange(0, E_PAD), acc)


@triton.jit
def _place_by_sort(ex, first, row0, below, sorted_ptr, N: tl.constexpr, E_PAD: tl.constexpr):
    """Place N consecutive assignments first.. (ex [N]: their experts, E_PAD for none) sorted by
    (expert, index): the one at sorted position p of expert e goes to row row0[e] + p - below[e]
    (below: how many of these N belong to experts before e), so index order holds within an expert."""
    key = tl.sort(ex * N + tl.arange(0, N))
    ex_s = tl.minimum(key // N, E_PAD - 1)
    row = tl.gather(row0, ex_s, 0) + tl.arange(0, N) - tl.gather(below, ex_s, 0)
    tl.store(sorted_ptr + row, first + key % N, mask=key // N < E_PAD)


@triton.jit
def _store_block_owners(block_expert_ptr, end, b_lo, b_hi, BM: tl.constexpr, BB: tl.constexpr):
    """block_expert[b] for b in [b_lo, b_hi): the number of experts whose padded range (inclusive
    ends `end`) ends at or before the block, or -1 past the last used block."""
    total = tl.max(end, axis=0)
    for b0 in range(b_lo, b_hi, BB):
        b = b0 + tl.arange(0, BB)
        owner = tl.sum((end[None, :] <= (b * BM)[:, None]).to(tl.int32), axis=1)
        owner = tl.where(b * BM < total, owner, -1)
        tl.store(block_expert_ptr + b, owner, mask=b < b_hi)


@triton.jit(do_not_specialize=["NUMEL", "CHUNK", "MAX_BLOCKS", "NC"])
def _align_scatter_kernel(
    id_ptr, count_ptr, sorted_ptr, block_expert_ptr, NUMEL, CHUNK, E, MAX_BLOCKS, NC,
    SINGLE: tl.constexpr, NC_PAD: tl.constexpr, E_PAD: tl.constexpr, BM: tl.constexpr,
    SUB: tl.constexpr, BB: tl.constexpr, CP: tl.constexpr, PDL: tl.constexpr,
):
    """grid (NC,). Every program derives the padded expert offsets from the counts (NC == 1:
    counts itself), then places its own chunk's assignments, fills the padding of experts
    e % NC == pid with the sentinel NUMEL, and writes its share of block_expert. CP > 0 (a power of
    two >= CHUNK): the chunk is ranked in one `tl.sort` by (expert, index); CP == 0: SUB assignments
    a step, ranked by a one-hot cumsum. Both keep index order within an expert."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    e = tl.arange(0, E_PAD)
    if SINGLE:  # NC == 1
        before = tl.zeros((E_PAD,), dtype=tl.int32)
        tot = tl.zeros((E_PAD,), dtype=tl.int32)
        for s in range(0, NUMEL, SUB):
            i = s + tl.arange(0, SUB)
            tot += tl.histogram(tl.load(id_ptr + i, mask=i < NUMEL, other=0), E_PAD, mask=i < NUMEL)
    else:
        r = tl.arange(0, NC_PAD)
        cnt = tl.load(count_ptr + r[:, None] * E_PAD + e[None, :], mask=(r < NC)[:, None], other=0)
        tot = tl.sum(cnt, axis=0)  # [E_PAD]
        before = tl.sum(tl.where((r < pid)[:, None], cnt, 0), axis=0)
    padded = (tot + BM - 1) // BM * BM
    end = tl.cumsum(padded, axis=0)  # [E_PAD] inclusive
    start = end - padded
    base = start + before  # where this chunk's rows of expert e begin
    # place this chunk's assignments
    if CP > 0:
        j = tl.arange(0, CP)
        m = (pid * CHUNK + j < NUMEL) & (j < CHUNK)
        ex = tl.load(id_ptr + pid * CHUNK + j, mask=m, other=E_PAD)  # masked: after every real expert
        mine = tl.histogram(ex, E_PAD, mask=m)
        _place_by_sort(ex, pid * CHUNK, base, tl.cumsum(mine, axis=0) - mine, sorted_ptr, CP, E_PAD)
    else:
        for s in range(0, CHUNK, SUB):
            j = s + tl.arange(0, SUB)
            i = pid * CHUNK + j
            m = (i < NUMEL) & (j < CHUNK)
            ex = tl.load(id_ptr + i, mask=m, other=E_PAD)  # masked rows match no expert
            oh = (ex[:, None] == e[None, :]).to(tl.int32)  # [SUB,E_PAD]
            rank = tl.sum(oh * (tl.cumsum(oh, axis=0) - 1), axis=1)
            pos = tl.sum(oh * base[None, :], axis=1) + rank
            tl.store(sorted_ptr + pos, i, mask=m)
            base += tl.sum(oh, axis=0)
    # sentinel in the padding rows of the experts this program owns
    c = tl.arange(0, BM)
    pm = ((e % NC) == pid)[:, None] & (c[None, :] < (padded - tot)[:, None])
    tl.store(sorted_ptr + (start + tot)[:, None] + c[None, :], NUMEL, mask=pm)
    per = tl.cdiv(MAX_BLOCKS, NC)
    _store_block_owners(block_expert_ptr, end, pid * per, tl.minimum(pid * per + per, MAX_BLOCKS), BM, BB)


@triton.jit(do_not_specialize=["NUMEL", "MAX_BLOCKS"])
def _align_sort_kernel(id_ptr, sorted_ptr, block_expert_ptr, NUMEL, E, MAX_BLOCKS, NP: tl.constexpr,
                       E_PAD: tl.constexpr, BM: tl.constexpr, BB: tl.constexpr, PDL: tl.constexpr):
    """grid (1,), NUMEL <= NP: the single-chunk alignment without a per-step scan. The assignments
    are sorted by (expert, index) in one `tl.sort`; the one at sorted position p of expert e goes to
    row start[e] + p - (assignments of experts below e): the order within an expert is the index
    order, as `_align_scatter_kernel` places them, so the outputs are the same."""
    pdl_start(PDL)
    i = tl.arange(0, NP)
    valid = i < NUMEL
    ex = tl.load(id_ptr + i, mask=valid, other=E_PAD)  # past NUMEL: after every real expert
    tot = tl.histogram(ex, E_PAD, mask=valid)  # [E_PAD]
    padded = (tot + BM - 1) // BM * BM
    end = tl.cumsum(padded, axis=0)
    start = end - padded
    _place_by_sort(ex, 0, start, tl.cumsum(tot, axis=0) - tot, sorted_ptr, NP, E_PAD)
    c = tl.arange(0, BM)
    pm = c[None, :] < (padded - tot)[:, None]
    tl.store(sorted_ptr + (start + tot)[:, None] + c[None, :], NUMEL, mask=pm)
    _store_block_owners(block_expert_ptr, end, 0, MAX_BLOCKS, BM, BB)


# up to this many assignments (one chunk), one program aligns them with a sort (_align_sort_kernel);
# above, count + scatter with each chunk ranked by a sort (0: the scatter kernels always).
# benchmarks/kernels/bench_align.py --small-only times the three ways: on the H100 at 72 assignments
# 10.0 us for the one-program sort, 15.3 one-hot; at 288-4,095, 12-15 us for the sort-ranked chunks,
# 12-80 the one-program sort (it grows past 1,024), 26-83 one-hot.
ALIGN_SORT_MAX = 256
ALIGN_RANK_SORT = True  # the multi-chunk scatter ranks each chunk with a sort, not SUB-wide one-hot steps


def align_block_size(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids[T,k] int32 -> (sorted_ids[max_blocks*BM] int32, block_expert[max_blocks] int32)."""
    numel = ids.numel()
    max_blocks = triton.cdiv(numel + min(numel, num_experts) * (block_m - 1), block_m)
    dev = ids.device
    sorted_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=dev)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=dev)
    e_pad = triton.next_power_of_2(num_experts)
    flat = ids.reshape(-1)
    if numel <= ALIGN_SORT_MAX:
        n_pad = max(16, triton.next_power_of_2(numel))
        _align_sort_kernel[(1,)](flat, sorted_ids, block_expert, numel, num_experts, max_blocks,
                                 NP=n_pad, E_PAD=e_pad, BM=block_m, BB=64,
                                 num_warps=4 if n_pad <= 1024 else 8, **pdl_kwargs(ids.device))
        return sorted_ids, block_expert
    # one program ranks up to 1,024 assignments one-hot (up to one chunk where chunks are ranked by a sort)
    one_program = numel <= (ALIGN_CHUNK if ALIGN_RANK_SORT else 1024)
    nc = 1 if one_program else min(ALIGN_MAX_CHUNKS, triton.cdiv(numel, ALIGN_CHUNK))
    chunk = triton.cdiv(numel, nc)
    counts = sorted_ids  # unused when nc == 1
    if nc > 1:
        counts = torch.empty((nc, e_pad), dtype=torch.int32, device=dev)
        _align_count_kernel[(nc,)](flat, counts, numel, chunk, num_experts, E_PAD=e_pad, SUB=128,
                                   **pdl_kwargs(ids.device))
    _align_scatter_kernel[(nc,)](
        flat, counts, sorted_ids, block_expert, numel, chunk, num_experts, max_blocks, nc,
        SINGLE=nc == 1, NC_PAD=triton.next_power_of_2(nc), E_PAD=e_pad, BM=block_m, SUB=_SUB, BB=64,
        CP=triton.next_power_of_2(chunk) if ALIGN_RANK_SORT and nc > 1 else 0,
        num_warps=4 if nc == 1 else 8, **pdl_kwargs(ids.device),
    )
    return sorted_ids, block_expert


@triton.jit(do_not_specialize=["NUMEL", "MAX_BLOCKS"])
def _moe_gemm_kernel(
    a_ptr, w_ptr, w_desc, out_ptr, sorted_ptr, block_expert_ptr, topw_ptr,
    NUMEL, N, K, MAX_BLOCKS, stride_am, stride_we, stride_wn, stride_om,
    A_DIV: tl.constexpr, GATED: tl.constexpr, MUL_W: tl.constexpr, EVEN_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, TMA: tl.constexpr,
    DIRECT: tl.constexpr, PDL: tl.constexpr,
):
    """One [BM, BN] output tile of expert-sorted rows. GATED: out = silu(A Wg^T) * (A Wu^T) with
    Wu = rows N.. of the same expert (w13); else out = A W^T (* routing weight when MUL_W).
    A row = sorted assignment // A_DIV (token for gate_up, assignment for down).
    TMA: weight tiles come through the bulk-copy engine (w_desc: the weights as [E*rows, K], tile
    [BN, BK]); rows past an expert's N read its neighbour's and land only in masked-off columns,
    K past the end reads zeros.
    DIRECT (one token, no sort): block b is assignment b alone (block_expert_ptr: the token's
    expert ids), so the expert alignment kernel is skipped; row 0 is real, the rest padding.
    PDL (launched as a programmatic dependent of the previous kernel): the program may start while
    the previous kernel drains; it reads nothing before gdc_wait, then lets the next kernel launch."""
    pdl_start(PDL)
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = pid // in_group * GROUP_M
    group = tl.minimum(MAX_BLOCKS - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group
    pid_n = (pid % in_group) // group
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    if DIRECT:
        rows = tl.where(tl.arange(0, BM) == 0, pid_m, NUMEL)  # [BM] int32
    else:
        rows = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))  # [BM] int32
    rmask = rows < NUMEL
    offs_n = (pid_n * BN + tl.arange(0, BN)) % N  # wrap: loads need no mask, the store does
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + (rows // A_DIV).to(tl.int64)[:, None] * stride_am + offs_k[None, :]  # [BM,BK]
    w_ptrs = w_ptr + expert * stride_we + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]  # [BK,BN]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros((BM, BN), dtype=tl.float32)
    w_row = (expert * (stride_we // stride_wn) + pid_n * BN).to(tl.int32)  # TMA: first weight row of the tile
    for k0 in range(0, K, BK):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
        else:
            km = offs_k < K - k0
            a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
        if TMA:
            b = w_desc.load([w_row, k0]).T
        elif EVEN_K:
            b = tl.load(w_ptrs)
        else:
            b = tl.load(w_ptrs, mask=km[:, None], other=0.0)
        acc = tl.dot(a, b, acc)
        if GATED:
            if TMA:
                b2 = w_desc.load([w_row + N, k0]).T
            elif EVEN_K:
                b2 = tl.load(w_ptrs + N * stride_wn)
            else:
                b2 = tl.load(w_ptrs + N * stride_wn, mask=km[:, None], other=0.0)
            acc2 = tl.dot(a, b2, acc2)
        a_ptrs += BK
        w_ptrs += BK
    dt = out_ptr.dtype.element_ty
    if GATED:
        g = acc.to(dt).to(tl.float32)  # round like the reference's bf16 gate_up output
        res = (g * tl.sigmoid(g)).to(dt) * acc2.to(dt)
    else:
        if MUL_W:
            acc = acc * tl.load(topw_ptr + rows, mask=rmask, other=0.0)[:, None]
        res = acc
    cols = pid_n * BN + tl.arange(0, BN)
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(o_ptrs, res.to(dt), mask=rmask[:, None] & (cols < N)[None, :])


@triton.jit
def _combine_kernel(y_ptr, out_ptr, H, TOPK: tl.constexpr, BH: tl.constexpr, PDL: tl.constexpr):
    """grid (T * cdiv(H, BH),): out[t] = sum_j y[t*TOPK + j] in fp32. A token's column blocks are
    neighbouring programs, so the programs running at once stream whole rows of y."""
    pdl_start(PDL)
    n_h = tl.cdiv(H, BH)
    pid = tl.program_id(0)
    t = (pid // n_h).to(tl.int64)
    h = (pid % n_h) * BH + tl.arange(0, BH)
    m = h < H
    acc = tl.zeros((BH,), dtype=tl.float32)
    for j in tl.static_range(TOPK):
        acc += tl.load(y_ptr + (t * TOPK + j) * H + h, mask=m, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * H + h, acc.to(out_ptr.dtype.element_ty), mask=m)


def _weight_descriptor(w: torch.Tensor, bn: int, bk: int):  # type: ignore[no-untyped-def]
    """Host TMA descriptor of expert weights [E, rows, K] as [E*rows, K] with a [bn, bk] tile, kept on
    the weight tensor itself (weights are static, so graph replays reuse it; it goes with them)."""
    cache = w.__dict__.setdefault("_tma_descriptors", {})
    key = (w.data_ptr(), bn, bk)  # (a tensor whose .data is swapped gets a new one)
    desc = cache.get(key)
    if desc is None:
        from triton.tools.tensor_descriptor import TensorDescriptor

        # a storage alias, not a view: a view's _base would tie w to its own cache in a cycle
        flat = torch.empty(0, dtype=w.dtype, device=w.device).set_(
            w.untyped_storage(), w.storage_offset(), (w.numel() // w.shape[-1], w.shape[-1]), (w.shape[-1], 1))
        desc = cache[key] = TensorDescriptor.from_tensor(flat, [bn, bk])
    return desc


def weight_descriptor(w: torch.Tensor, bn: int, bk: int, wanted: bool):  # type: ignore[no-untyped-def]
    """w's TMA descriptor for [bn, bk] tiles where wanted and the hardware and layout allow it (contiguous
    rows of a multiple of 16 bytes, the bulk-copy engine's stride unit), else None: pointer loads."""
    if not (wanted and tma_supported(w.device) and w.is_contiguous() and (w.shape[-1] * w.element_size()) % 16 == 0):
        return None
    return _weight_descriptor(w, bn, bk)


def tma_supported(device: torch.device) -> bool:
    """Hopper or newer (the tensor memory accelerator); the CPU interpreter emulates it."""
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_capability(device)[0] >= 9


def _gemm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor, sorted_ids: torch.Tensor | None,
          block_expert: torch.Tensor, topw: torch.Tensor, numel: int, n: int, k: int, a_div: int, gated: bool,
          block_m: int, cfg: dict, pdl: bool = False) -> None:
    """One grouped-GEMM launch (gate_up when gated, else down); sorted_ids None: the one-token path.
    cfg "tma": weight tiles through the tensor memory accelerator where the hardware and layout allow."""
    max_blocks = block_expert.shape[0]
    bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
    grid = (max_blocks * triton.cdiv(n, bn),)
    desc = weight_descriptor(w, bn, bk, bool(cfg.get("tma")))
    _moe_gemm_kernel[grid](
        a, w, desc, out, sorted_ids, block_expert, topw, numel, n, k, max_blocks,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        A_DIV=a_div, GATED=gated, MUL_W=not gated, EVEN_K=k % bk == 0, BM=block_m,
        BN=bn, BK=bk, GROUP_M=cfg["GROUP_M"], TMA=desc is not None, DIRECT=sorted_ids is None,
        PDL=pdl, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl,
    )


def fused_moe(
    x: torch.Tensor,  # [T,H]
    w13: torch.Tensor,  # [E,2I,H]
    w2: torch.Tensor,  # [E,H,I]
    weights: torch.Tensor,  # [T,k] fp32
    ids: torch.Tensor,  # [T,k] int32
) -> torch.Tensor:  # [T,H]
    """sum_j weights[t,j] * down_e(silu(gate_e x) * up_e x), e = ids[t,j]; tuned/heuristic config."""
    return fused_moe_with_config(x, w13, w2, weights, ids, None)


def fused_moe_with_config(
    x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
    config: dict | None,  # None: get_config(); benchmarks/kernels/tune_moe.py and tests pass candidates
) -> torch.Tensor:
    n_tok, hidden = x.shape
    num_experts, n2, _ = w13.shape
    inter = n2 // 2
    top_k = ids.shape[1]
    out = torch.empty((n_tok, hidden), dtype=x.dtype, device=x.device)
    if n_tok == 0:
        return out
    for t in (w13, w2):
        if t.stride(-1) != 1:
            raise ValueError("fused_moe: expert weights need a contiguous last dim")
    x = x if x.stride(-1) == 1 else x.contiguous()
    cfg = config or get_config(n_tok, num_experts, n2, hidden, top_k, x.dtype, x.device)
    bm = cfg["BLOCK_M"]
    numel = n_tok * top_k
    if n_tok == 1:  # the k assignments are k distinct experts: one block each, no sort needed
        sorted_ids, block_expert = None, ids.reshape(-1).to(torch.int32)
    else:
        sorted_ids, block_expert = align_block_size(ids.to(torch.int32), num_experts, bm)
    # every tensor the GEMMs read is made before the first of them: nothing launches in between, so
    # each kernel's programmatic predecessor is the one before it in this pipeline
    topw = weights.reshape(-1).float().contiguous()
    act = torch.empty((numel, inter), dtype=x.dtype, device=x.device)  # [T*k, I]
    y = torch.empty((numel, hidden), dtype=x.dtype, device=x.device)  # [T*k, H]
    pdl = pdl_enabled(x.device)
    _gemm(x, w13, act, sorted_ids, block_expert, weights, numel, inter, hidden, top_k, True, bm, cfg["up"], pdl)
    _gemm(act, w2, y, sorted_ids, block_expert, topw, numel, hidden, inter, 1, False, bm, cfg["down"], pdl)
    combine(y, out, top_k, pdl)
    return out


def combine(y: torch.Tensor, out: torch.Tensor, top_k: int, pdl: bool) -> None:
    """out[t] = sum of y's rows t*top_k .. t*top_k + top_k - 1 (fp32 sum, one cast)."""
    n_tok, hidden = out.shape
    bh = min(1024, triton.next_power_of_2(hidden))
    _combine_kernel[(n_tok * triton.cdiv(hidden, bh),)](y, out, hidden, TOPK=top_k, BH=bh, PDL=pdl,
                                                         num_warps=4, launch_pdl=pdl)


__all__ = ["CONFIG_DIR", "ROUTER_MAX_TOKENS", "align_block_size", "config_name", "default_config", "fused_moe",
           "fused_moe_with_config", "get_config", "grouped_topk", "router_logits", "tma_supported", "weight_descriptor"]
