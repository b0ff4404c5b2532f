"""Triton fused MoE with FP8 (E4M3) expert weights and activations: the CUDA twin of
`reference.fused_moe_fp8`, on the FP8 tensor cores (fp8 x fp8 -> fp32).

The pipeline of triton_moe.fused_moe (its expert alignment and fp32 combine are reused; the shared
expert rides as an extra column; PDL; grids from host-known shapes only, so CUDA-graph safe), with:
1. x quantised once per token before the row gather (triton_fp8: per token, or per 1 x b group for
   block scales).
2. gate_up: x_q rows times w13[e]^T. Channel scales (block 0) apply once after the K loop,
   acc * s_x[token] * s13[e, n] (the sm_90 FP8 MMAs then accumulate the whole loop, in their own
   reduced precision: Triton's default for FP8 dots); block scales per K step (BLOCK_K == b),
   acc += dot * s_x[token, kb] * s13[e, n // b, kb] (an fp32 add per step). Epilogue silu(gate) * up in fp32, rounded to
   x.dtype, then quantised per assignment row (over its I columns, or per b columns). When a program
   holds whole quantisation groups (channel: BLOCK_N >= I; block: BLOCK_N a multiple of b) that is
   done in this epilogue (codes and scales stored); otherwise the rounded intermediate is stored and
   triton_fp8 quantises it in one more launch.
3. down: act_q rows times w2[e]^T with the same scale rules, times the routing weight -> y [T*k, H]
   in fp32, so that 4. the combine sums fp32 and casts once.
A config's "swap" computes a GEMM tile as W A^T ([BLOCK_N, BLOCK_M]): with few rows per expert
(decode) the weight rows then fill the tensor cores' 64-row side; the tile is transposed once in the
epilogue. Weights are [N, K] row-major, the K-major operand FP8 MMAs need. Tile configs: tables
named by moe_configs.table_dtype (written by benchmarks/kernels/tune_moe.py --dtype fp8|fp8-block),
else moe_configs.default_config_fp8.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.ops import triton_moe as tm
from common.ops.moe_configs import get_config
from common.ops.pdl import pdl_enabled, pdl_start, prefetch_programs, prefetch_rows
from common.ops.reference import FP8_AMAX_FLOOR, FP8_MAX, Routing, check_fused_moe_fp8
from common.ops.triton_fp8 import (
    _dot,
    _quant_code,
    _row_scale,
    _scaled_dot,
    hw_round,
    quant_fp8_per_group,
    quant_fp8_per_token,
)
from common.ops.triton_moe import route_slot

_ACT = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit(do_not_specialize=["NUMEL", "MAX_BLOCKS"])
def _moe_fp8_gemm_kernel(
    a_ptr, as_ptr, w_ptr, w_desc, ws_ptr, out_ptr, os_ptr, sorted_ptr, block_expert_ptr, topw_ptr,
    NUMEL, N, K, MAX_BLOCKS, stride_am, stride_as, stride_we, stride_wn, stride_wse, stride_wsn, stride_om,
    stride_os, early_programs, num_experts, first_slot,
    A_DIV: tl.constexpr, GATED: tl.constexpr, QUANT: tl.constexpr, ACT: tl.constexpr, BLOCKWISE: tl.constexpr,
    GROUP: tl.constexpr, EVEN_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    GROUP_M: tl.constexpr, TMA: tl.constexpr, DIRECT: tl.constexpr, SWAP: tl.constexpr, PDL: tl.constexpr,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, HW: tl.constexpr, IDS_READY: tl.constexpr,
    A_QUANT: tl.constexpr = False, ROW_CHUNK: tl.constexpr = 512,
    logit_ptr=None, bias_ptr=None, stride_ls=0, n_routed=0, route_scaling=1.0, ROUTE: tl.constexpr = False,
    EPG: tl.constexpr = 1, N_GROUP: tl.constexpr = 1, TOPK_GROUP: tl.constexpr = 1, TOPK: tl.constexpr = 1,
    RENORM: tl.constexpr = False, E_PAD: tl.constexpr = 1, G_PAD: tl.constexpr = 1, SPLITS: tl.constexpr = 1,
):
    """One [BM, BN] output tile of expert-sorted rows, FP8 operands, fp32 accumulation.
    A (a_ptr, e4m3): row = sorted assignment // A_DIV (token for gate_up, assignment for down), its
    scales as_ptr [rows, 1 | K/GROUP]. W (e4m3) [E, rows, K], its scales ws_ptr [E, rows/GROUP, 1 |
    K/GROUP] (GROUP 1: per row). BLOCKWISE: scales per K step of BK == GROUP columns, else once.
    GATED: h = silu(A Wg^T) * (A Wu^T), Wu = rows N.. of the expert, rounded to ACT; QUANT: h
    quantised per row (per GROUP columns when BLOCKWISE) into codes at out_ptr and scales at os_ptr
    (the program holds whole groups), else stored rounded. Not GATED: out = A W^T * routing weight.
    TMA, DIRECT, GROUP_M, PDL, the wrapped column offsets: as triton_moe._moe_gemm_kernel.
    DIRECT launches run block `first_slot` first (the fused shared experts, whose expert is known
    before the router runs); under PDL their first early_programs programs ask L2 for their weight
    rows before the wait (`pdl.prefetch_rows`) where the expert is known: blocks >= first_slot (the
    last MAX_BLOCKS - first_slot of num_experts), or every block when IDS_READY (the ids were written
    at least two launches back, so they are complete when this launch starts: the down GEMM).
    A_QUANT (down): A holds the intermediate unquantised (ACT) and as_ptr is unused; each A tile is
    quantised as it is loaded, to the codes and scales of `triton_fp8` (BLOCKWISE: each group from its
    own amax; per row: the row's amax over K taken first, ROW_CHUNK columns a step).
    ROUTE (one token's gate_up, DIRECT): no top-k launch ran; each program routes the token itself from
    the router's logits (`triton_moe.route_slot`: logit_ptr's SPLITS terms, the correction bias, the
    constexprs as `_grouped_topk_kernel` takes them) for its own slot, and the first program of each
    slot stores that slot's expert id and routing weight at block_expert_ptr / topw_ptr for down."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BN)
    in_group = GROUP_M * num_n
    first_m = pid // in_group * GROUP_M
    group = tl.minimum(MAX_BLOCKS - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group
    pid_n = (pid % in_group) // group
    if DIRECT:
        pid_m = (pid_m + first_slot) % MAX_BLOCKS
        if PDL and pid < early_programs:
            if IDS_READY:  # at L2 (.cg): nothing stale from an earlier launch's L1
                early = tl.load(block_expert_ptr + pid_m, cache_modifier=".cg")
            else:
                early = tl.where(pid_m >= first_slot, num_experts - MAX_BLOCKS + pid_m, -1)
            if early >= 0:  # a hint only: any expert id in range is safe to ask for
                pf_expert = tl.minimum(early, num_experts - 1).to(tl.int64)
                pf_rows = (pid_n * BN + tl.arange(0, BN)) % N
                if GATED:
                    pf_rows = tl.join(pf_rows, pf_rows + N).reshape(2 * BN)
                prefetch_rows(w_ptr + pf_expert * stride_we, pf_rows, stride_wn, 0, K)
    pdl_start(PDL)
    if ROUTE:
        slot_expert, slot_weight = route_slot(logit_ptr, bias_ptr, stride_ls, n_routed, pid_m, route_scaling, EPG,
                                              N_GROUP, TOPK_GROUP, TOPK, RENORM, E_PAD, G_PAD, SPLITS)
        if pid_n == 0:
            tl.store(block_expert_ptr + pid_m, slot_expert)
            tl.store(topw_ptr + pid_m, slot_weight)
        expert = slot_expert.to(tl.int64)
    else:
        expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    if expert < 0:
        return
    if DIRECT:
        rows = tl.where(tl.arange(0, BM) == 0, pid_m, NUMEL)  # [BM] int32
    else:
        rows = tl.load(sorted_ptr + pid_m * BM + tl.arange(0, BM))  # [BM] int32
    rmask = rows < NUMEL
    a_rows = (rows // A_DIV).to(tl.int64)  # [BM]
    offs_n = (pid_n * BN + tl.arange(0, BN)) % N  # wrap: loads need no mask, the store does
    offs_k = tl.arange(0, BK)
    a_ptrs = a_ptr + a_rows[:, None] * stride_am + offs_k[None, :]  # [BM,BK]
    w_ptrs = w_ptr + expert * stride_we + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]  # [BN,BK]
    sa_ptrs = as_ptr + a_rows * stride_as  # [BM]
    sw_ptrs = ws_ptr + expert * stride_wse + (offs_n // GROUP) * stride_wsn  # [BN]
    sw2_ptrs = ws_ptr + expert * stride_wse + ((offs_n + N) // GROUP) * stride_wsn  # [BN] (up rows)
    if SWAP:
        acc = tl.zeros((BN, BM), dtype=tl.float32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    acc2 = tl.zeros_like(acc)
    w_row = (expert * (stride_we // stride_wn) + pid_n * BN).to(tl.int32)  # TMA: first weight row of the tile
    # DIRECT blocks hold one real row (row 0): quantised alone, the other rows zero codes
    one_row: tl.constexpr = A_QUANT and DIRECT and not BLOCKWISE
    if one_row:  # row 0's scale from its whole K
        row0 = a_ptr + pid_m.to(tl.int64) // A_DIV * stride_am
        real = pid_m < NUMEL  # (a block past the assignments stores nothing; it reads nothing either)
        sa_row = _row_scale(row0, K, real, QMAX, FLOOR, ROW_CHUNK)
        sa_rows = tl.zeros((BM,), dtype=tl.float32) + sa_row
        first = (tl.arange(0, BM) == 0)[:, None]
    elif A_QUANT and not BLOCKWISE:  # the rows' scales from their whole K
        cols = tl.arange(0, ROW_CHUNK)
        amax = tl.zeros((BM,), dtype=tl.float32)
        for c0 in range(0, K, ROW_CHUNK):
            x = tl.load(a_ptr + a_rows[:, None] * stride_am + (c0 + cols)[None, :],
                        mask=rmask[:, None] & (cols < K - c0)[None, :], other=0.0)
            amax = tl.maximum(amax, tl.max(tl.abs(x.to(tl.float32)), axis=1))
        sa_rows = tl.math.div_rn(tl.maximum(amax, FLOOR), QMAX)  # [BM]
    for k0 in range(0, K, BK):
        km = offs_k < K - k0
        if one_row:
            q = _quant_code(tl.load(row0 + k0 + offs_k, mask=km & real, other=0.0).to(tl.float32), sa_row, QMAX, HW)
            a = tl.where(first, q[None, :], 0.0)
        elif EVEN_K:
            a = tl.load(a_ptrs, mask=rmask[:, None], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=rmask[:, None] & km[None, :], other=0.0)
        if TMA:
            b = w_desc.load([w_row, k0])
        elif EVEN_K:
            b = tl.load(w_ptrs)
        else:
            b = tl.load(w_ptrs, mask=km[None, :], other=0.0)
        if BLOCKWISE:
            if A_QUANT:
                af = a.to(tl.float32)
                sa = tl.math.div_rn(tl.maximum(tl.max(tl.abs(af), axis=1), FLOOR), QMAX)
                a = _quant_code(af, sa[:, None], QMAX, HW).to(b.dtype)
            else:
                sa = tl.load(sa_ptrs + k0 // BK, mask=rmask, other=0.0)
            acc += _scaled_dot(a, b, sa, tl.load(sw_ptrs + k0 // BK), SWAP)
        else:
            if one_row:
                a = a.to(b.dtype)
            elif A_QUANT:
                a = _quant_code(a.to(tl.float32), sa_rows[:, None], QMAX, HW).to(b.dtype)
            acc = _dot(a, b, acc, SWAP)
        if GATED:
            if TMA:
                b2 = w_desc.load([w_row + N, k0])
            elif EVEN_K:
                b2 = tl.load(w_ptrs + N * stride_wn)
            else:
                b2 = tl.load(w_ptrs + N * stride_wn, mask=km[None, :], other=0.0)
            if BLOCKWISE:
                acc2 += _scaled_dot(a, b2, sa, tl.load(sw2_ptrs + k0 // BK), SWAP)
            else:
                acc2 = _dot(a, b2, acc2, SWAP)
        a_ptrs += BK
        w_ptrs += BK
    if SWAP:
        acc = acc.T
        acc2 = acc2.T
    if not BLOCKWISE:
        if A_QUANT:
            sa = sa_rows
        else:
            sa = tl.load(sa_ptrs, mask=rmask, other=0.0)
        acc = acc * sa[:, None] * tl.load(sw_ptrs)[None, :]
        if GATED:
            acc2 = acc2 * sa[:, None] * tl.load(sw2_ptrs)[None, :]
    cols = pid_n * BN + tl.arange(0, BN)
    cmask = cols < N
    if GATED:
        res = (acc * tl.sigmoid(acc) * acc2).to(ACT).to(tl.float32)
        if QUANT:
            res = tl.where(cmask[None, :], res, 0.0)  # wrapped columns repeat real ones: not in the amax
            if BLOCKWISE:
                hg = tl.reshape(res, (BM, BN // GROUP, GROUP))
                scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(hg), axis=2), FLOOR), QMAX)  # [BM, BN/GROUP]
                res = tl.reshape(_quant_code(hg, scale[:, :, None], QMAX, HW), (BM, BN))
                g = pid_n * (BN // GROUP) + tl.arange(0, BN // GROUP)
                tl.store(os_ptr + rows.to(tl.int64)[:, None] * stride_os + g[None, :], scale,
                         mask=rmask[:, None] & (g < N // GROUP)[None, :])
            else:  # one program holds the whole row (BN >= N)
                scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(res), axis=1), FLOOR), QMAX)  # [BM]
                res = _quant_code(res, scale[:, None], QMAX, HW)
                tl.store(os_ptr + rows.to(tl.int64) * stride_os, scale, mask=rmask)
    else:
        res = acc * tl.load(topw_ptr + rows, mask=rmask, other=0.0)[:, None]
    o_ptrs = out_ptr + rows.to(tl.int64)[:, None] * stride_om + cols[None, :]
    tl.store(o_ptrs, res.to(out_ptr.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


ROWS_DTYPE: torch.dtype | None = None  # the per-assignment down rows' dtype (None: x's); benchmarks set fp32
# Up to this many tokens the down GEMM quantises the intermediate as it loads it, where gate_up's
# epilogue cannot (one launch fewer). Off (0): at one token, on Air at full depth on an H100, the
# decode and EAGLE steps measured the same with and without it (6494 / 6493 us, 14709 / 14648 us;
# again with only the one real row quantised, 6219 / 6228 us, docs/performance.md §7s).
DOWN_QUANT_TOKENS = 0


def fuses_quant(inter: int, block: int, block_n: int) -> bool:
    """Whether gate_up quantises the intermediate in its epilogue: each program holds whole groups."""
    return block_n % block == 0 if block else block_n >= inter


def _gemm(a: torch.Tensor, a_scale: torch.Tensor | None, w: torch.Tensor, w_scale: torch.Tensor, out: torch.Tensor,
          out_scale: torch.Tensor | None, sorted_ids: torch.Tensor | None, block_expert: torch.Tensor,
          topw: torch.Tensor | None, numel: int, n: int, k: int, a_div: int, gated: bool, block: int, act: torch.dtype,
          block_m: int, cfg: dict, pdl: bool, shared: int = 0, route: tuple | None = None,
          ids_ready: bool = True) -> None:
    """One grouped FP8 GEMM launch (gate_up when gated, else down); out_scale given: gate_up
    quantises its output (out e4m3). sorted_ids None: the one-token path, whose gate_up runs the
    last `shared` blocks (fused shared experts) first and asks L2 for their weights early, and whose
    down asks for every block's (ids_ready: the ids were written two launches back or earlier);
    topw None: gate_up; a_scale None (down only): `a` is unquantised and the kernel quantises it as
    it loads it. route (one token's gate_up): (logits [S,1,E], Routing, weights [k] fp32): the kernel
    routes the token and writes block_expert and the weights."""
    max_blocks = block_expert.shape[0]
    bn, bk = cfg["BLOCK_N"], block or cfg["BLOCK_K"]
    direct = sorted_ids is None
    first_slot = max_blocks - shared if direct and gated else 0
    early = prefetch_programs(bn * (2 if gated else 1) * k,
                              pdl and direct and (shared > 0 or (not gated and ids_ready)))
    desc = tm.weight_descriptor(w, bn, bk, bool(cfg.get("tma")))
    scale_out = out if out_scale is None else out_scale  # (unused without QUANT)
    a_quant = a_scale is None
    if a_quant and gated:
        raise ValueError("fused_moe_fp8: gate_up takes its input quantised")
    a_scale = w_scale if a_quant else a_scale  # (unused under A_QUANT)
    route_args: dict = {}
    if route is not None:
        logits, routing, topw = route
        n_routed, n_group = logits.shape[-1], routing.n_group
        route_args = {
            "logit_ptr": logits, "bias_ptr": routing.correction_bias, "stride_ls": logits.stride(0),
            "n_routed": n_routed, "route_scaling": float(routing.scaling), "ROUTE": True, "EPG": n_routed // n_group,
            "N_GROUP": n_group, "TOPK_GROUP": routing.topk_group, "TOPK": routing.top_k, "RENORM": routing.renormalize,
            "E_PAD": triton.next_power_of_2(n_routed), "G_PAD": triton.next_power_of_2(n_group),
            "SPLITS": logits.shape[0]}
    _moe_fp8_gemm_kernel[(max_blocks * triton.cdiv(n, bn),)](
        a, a_scale, w, desc, w_scale, out, scale_out, sorted_ids, block_expert, a_scale if topw is None else topw, numel, n, k, max_blocks,
        a.stride(0), 0 if a_quant else a_scale.stride(0), w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1),
        out.stride(0), scale_out.stride(0), early, w.shape[0], first_slot,
        A_DIV=a_div, GATED=gated, QUANT=out_scale is not None, ACT=_ACT[act], BLOCKWISE=block > 0,
        GROUP=max(block, 1), EVEN_K=k % bk == 0, BM=block_m, BN=bn, BK=bk, GROUP_M=cfg["GROUP_M"], TMA=desc is not None,
        DIRECT=direct, SWAP=bool(cfg.get("swap")), PDL=pdl, QMAX=FP8_MAX, FLOOR=FP8_AMAX_FLOOR,
        HW=hw_round(a.device), IDS_READY=not gated, A_QUANT=a_quant,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], launch_pdl=pdl, **route_args,
    )


def quantize(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x[R,K] -> (codes[R,K] e4m3, scales[R, 1 | K/block] fp32): per row, or per 1 x block group."""
    return quant_fp8_per_group(x, block) if block else quant_fp8_per_token(x)


def gate_up(x_q: torch.Tensor, x_s: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor,
            sorted_ids: torch.Tensor | None, block_expert: torch.Tensor, top_k: int, block: int, act: torch.dtype,
            block_m: int, cfg: dict, pdl: bool, shared: int = 0,
            down_quantises: bool = False, route: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The gate_up GEMM and the intermediate's quantisation (in its epilogue or one more launch):
    (act_q [T*k, I] e4m3, act_s [T*k, 1 | I/block] fp32). shared, route: as _gemm's. down_quantises:
    where the epilogue cannot quantise, (the intermediate in `act`, None), for the down GEMM to
    quantise as it loads it (no launch in between)."""
    numel, inter = x_q.shape[0] * top_k, w13.shape[1] // 2
    if fuses_quant(inter, block, cfg["BLOCK_N"]):
        act_q = torch.empty((numel, inter), dtype=torch.float8_e4m3fn, device=x_q.device)
        act_s = torch.empty((numel, inter // block if block else 1), dtype=torch.float32, device=x_q.device)
        _gemm(x_q, x_s, w13, s13, act_q, act_s, sorted_ids, block_expert, None, numel, inter, w13.shape[2], top_k,
              True, block, act, block_m, cfg, pdl, shared, route)
        return act_q, act_s
    act_h = torch.empty((numel, inter), dtype=act, device=x_q.device)  # [T*k, I]
    _gemm(x_q, x_s, w13, s13, act_h, None, sorted_ids, block_expert, None, numel, inter, w13.shape[2], top_k, True,
          block, act, block_m, cfg, pdl, shared, route)
    return (act_h, None) if down_quantises else quantize(act_h, block)


def down(act_q: torch.Tensor, act_s: torch.Tensor | None, w2: torch.Tensor, s2: torch.Tensor, y: torch.Tensor,
         sorted_ids: torch.Tensor | None, block_expert: torch.Tensor, topw: torch.Tensor, block: int,
         block_m: int, cfg: dict, pdl: bool, ids_ready: bool = True) -> None:
    """The down GEMM times the routing weight (in fp32), rounded into y [T*k, H] (x's dtype); act_s
    None: act_q is the unquantised intermediate, quantised in the GEMM. ids_ready: as _gemm's."""
    numel, hidden = y.shape
    _gemm(act_q, act_s, w2, s2, y, None, sorted_ids, block_expert, topw, numel, hidden, w2.shape[2], 1, False,
          block, y.dtype, block_m, cfg, pdl, ids_ready=ids_ready)


def fused_moe_fp8(
    x: torch.Tensor,  # [T,H] bf16 | fp16 | fp32
    w13: torch.Tensor,  # [E,2I,H] e4m3
    s13: torch.Tensor,  # fp32 [E,2I,1] | [E,2I/b,H/b]
    w2: torch.Tensor,  # [E,H,I] e4m3
    s2: torch.Tensor,  # fp32 [E,H,1] | [E,H/b,I/b]
    weights: torch.Tensor,  # [T,k] fp32
    ids: torch.Tensor,  # [T,k] int32
    block: int = 0,
    x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,  # (x_q, s_x) from x's producer
    num_shared: int = 0,  # the last ids columns: fused shared experts (the last experts)
    combine: bool = True,  # False: the rows [T,k,H] for the next norm to sum (no combine launch)
) -> torch.Tensor:  # [T,H] x.dtype
    """reference.fused_moe_fp8 on the FP8 tensor cores; tuned/heuristic config."""
    return fused_moe_fp8_with_config(x, w13, s13, w2, s2, weights, ids, block, None, x_quant, num_shared, combine)


def fused_moe_fp8_with_config(
    x: torch.Tensor, w13: torch.Tensor, s13: torch.Tensor, w2: torch.Tensor, s2: torch.Tensor,
    weights: torch.Tensor, ids: torch.Tensor, block: int,
    config: dict | None,  # None: get_config(); benchmarks/kernels/tune_moe.py and tests pass candidates
    x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,
    num_shared: int = 0,
    combine: bool = True,
    route: tuple[torch.Tensor, Routing] | None = None,  # one token: (logits, routing), weights / ids its outputs
) -> torch.Tensor:
    check_fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block)
    if route is not None and (x.shape[0] != 1 or ids.dtype != torch.int32 or weights.dtype != torch.float32):
        raise ValueError("fused_moe_fp8: routing inside gate_up takes one token, ids int32 and weights float32")
    if block & (block - 1) or 0 < block < 16:
        raise ValueError(f"fused_moe_fp8: the kernel's K step is the block: block={block} must be a power of two >= 16")
    for name, t in (("w13", w13), ("w2", w2)):
        if t.stride(-1) != 1:
            raise ValueError(f"fused_moe_fp8: {name} needs a contiguous last dim")
    n_tok, hidden = x.shape
    num_experts, n2, _ = w13.shape
    top_k = ids.shape[1]
    if n_tok == 0:
        return x.new_empty((0, hidden) if combine else (0, top_k, hidden))
    cfg = config or get_config(n_tok, num_experts, n2, hidden, top_k, x.dtype, x.device, fp8_block=block)
    bm = cfg["BLOCK_M"]
    s13, s2 = s13.contiguous(), s2.contiguous()
    if n_tok == 1:  # the k assignments are k distinct experts: one block each, no sort needed
        sorted_ids, block_expert = None, ids.reshape(-1).to(torch.int32)
    else:
        sorted_ids, block_expert = tm.align_block_size(ids.to(torch.int32), num_experts, bm)
    topw = weights.reshape(-1).float().contiguous()  # (routed in gate_up: weights' own storage)
    # per-assignment rows in x's dtype (halves the down GEMM's stores and the combine's reads against
    # fp32: 1.2 GB a layer at an 8K prefill of Air); the combine sums them in fp32
    y = torch.empty((n_tok * top_k, hidden), dtype=ROWS_DTYPE or x.dtype, device=x.device)  # [T*k, H]
    # the launch right before gate_up (PDL: its programmatic predecessor), unless x's producer quantised it
    x_q, x_s = x_quant if x_quant is not None else quantize(x, block)
    pdl = pdl_enabled(x.device)
    down_quantises = n_tok <= DOWN_QUANT_TOKENS
    gate_up_route = None if route is None else (*route, topw)
    act_q, act_s = gate_up(x_q, x_s, w13, s13, sorted_ids, block_expert, top_k, block, x.dtype, bm, cfg["up"], pdl,
                           num_shared, down_quantises, gate_up_route)
    # ids written by gate_up are complete when down starts only with a quantiser launch in between
    quant_between = not fuses_quant(w2.shape[2], block, cfg["up"]["BLOCK_N"]) and not down_quantises
    down(act_q, act_s, w2, s2, y, sorted_ids, block_expert, topw, block, bm, cfg["down"], pdl,
         route is None or quant_between)
    if not combine:
        return y.view(n_tok, top_k, hidden)
    out = torch.empty((n_tok, hidden), dtype=x.dtype, device=x.device)
    tm.combine(y, out, top_k, pdl)
    return out


# One token's FP8 MoE routes inside its gate_up GEMM (`routed_moe_fp8`): the top-k launch between the
# router and gate_up goes. False: grouped_topk's launch, then the fused MoE, for timing the two.
ROUTE_IN_GATE_UP = True


def routed_moe_fp8(
    x: torch.Tensor, router_logits: torch.Tensor, routing: Routing, w13: torch.Tensor, s13: torch.Tensor,
    w2: torch.Tensor, s2: torch.Tensor, block: int = 0, x_quant: tuple[torch.Tensor, torch.Tensor] | None = None,
    combine: bool = True,
) -> torch.Tensor:
    """reference.routed_moe_fp8: one token (ROUTE_IN_GATE_UP) is routed by the gate_up GEMM's programs,
    each for its own slot; more tokens take grouped_topk's launch, then fused_moe_fp8."""
    if x.shape[0] != 1 or not ROUTE_IN_GATE_UP:
        weights, ids = tm.grouped_topk(router_logits, *routing)
        return fused_moe_fp8(x, w13, s13, w2, s2, weights, ids, block, x_quant, routing.num_shared, combine)
    logits = router_logits if router_logits.dim() == 3 else router_logits[None]  # [S,1,E]
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    routing = routing._replace(correction_bias=routing.correction_bias.float().contiguous())
    width = routing.top_k + routing.num_shared
    weights = torch.empty((1, width), dtype=torch.float32, device=x.device)
    ids = torch.empty((1, width), dtype=torch.int32, device=x.device)
    return fused_moe_fp8_with_config(x, w13, s13, w2, s2, weights, ids, block, None, x_quant, routing.num_shared,
                                     combine, (logits, routing))


__all__ = ["DOWN_QUANT_TOKENS", "ROUTE_IN_GATE_UP", "down", "fused_moe_fp8", "fused_moe_fp8_with_config", "fuses_quant",
           "gate_up", "quantize", "routed_moe_fp8"]
