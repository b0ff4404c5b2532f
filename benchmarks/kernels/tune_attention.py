"""Sweep the tiles of the Triton paged attention on this GPU: the extend/prefill tiles, or (--decode)
the small-query tiles and split-K counts of decode, draft and verify batches.

    python3 -m benchmarks.kernels.tune_attention [--budget-s 60]
    python3 -m benchmarks.kernels.tune_attention --decode [--batches 1,32,64] [--context 1024]
        [--budget-s 150] [--write tiles.json]

Extend: for 1x2048 (no prefix) and 1x2048 after a 4K prefix (96 q heads, 8 KV heads, head 128, page
16), times paged_attention with each (BLOCK_M rows, BLOCK_N, num_warps, num_stages) candidate in
place of triton_paged.plan()'s extend choice (CUDA-graph replays, median), prints each with its
fraction of the FLOP roofline, and the best.

Decode: for each batch size, B sequences of --context tokens with one query each (decode and the
chain draft: 12 rows of a KV head) and with four (the EAGLE (3,1,4) verify and draft extend under a
causal tree mask: 48 rows), times every (BLOCK_M, BLOCK_N, num_warps, num_stages, split count)
candidate against the K/V bytes floor at the measured read bandwidth; each candidate's output must
equal plan()'s to within bf16 rounding (else it is reported and dropped). --write saves the best
per (batch, rows) as JSON, which `bench_full_depth --ab attn-tiles=FILE` serves in place of plan()
to time the whole step with them. The winners go into plan() by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch

from benchmarks import measure
from benchmarks.kernels.bench_kernels import _attn_sets
from common.attention import triton_paged as tp
from common.ops.moe_configs import num_sms

CASES = {"extend 1x2048": [(2048, 2048, 0, False)], "extend 1x2048 after 4K": [(2048, 6144, None, False)]}
HK, HQ, D = 8, 96, 128
SPLITS = (1, 2, 4, 8, 16, 33, 64)
T = TypeVar("T")


def _under(tile: tuple[int, ...], fn: Callable[[], T], label: str) -> T | None:
    """fn() with plan() answering `tile`; None (reported under `label`) where the tile fails to compile or fit."""
    served = tp.plan
    tp.plan = lambda *a: tile  # type: ignore[assignment]
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a tile that does not fit
        print(f"{label}: {type(exc).__name__}", flush=True)
        return None
    finally:
        tp.plan = served


def _time(sets: list, kc: torch.Tensor, vc: torch.Tensor) -> float:
    return measure.time_graph([lambda q=q, b=b: tp.paged_attention(q, kc, vc, b, 0.088) for q, b in sets], reps=10)


def extend_sweep(budget_s: float) -> None:
    deadline = time.time() + budget_s
    ceil = measure.measure_ceilings(None)
    cands = list(itertools.product((128, 64), (64, 128, 32), (8, 4), (2, 3, 4)))
    for name, spec in CASES.items():
        kc, vc, sets = _attn_sets(spec, 2)
        q_len, seq_len = spec[0][0], spec[0][1]
        prefix = seq_len - q_len
        flops = 4 * HQ * D * (q_len * prefix + q_len * (q_len + 1) / 2)
        best = None
        for bm, bn, warps, stages in cands:
            if time.time() > deadline:
                break
            t = _under((bm, bn, warps, stages, 1), lambda s=sets, k=kc, v=vc: _time(s, k, v),
                       f"{name}: BM={bm} BN={bn} w={warps} s={stages}")
            if t is None:
                continue
            frac = flops / (t * 1e6) / ceil["gemm_tflops"]
            print(f"{name}: BM={bm} BN={bn} w={warps} s={stages}: {t:.1f} us, {flops / t / 1e6:.0f} TFLOP/s "
                  f"({frac:.0%} of peak)", flush=True)
            if best is None or t < best[0]:
                best = (t, bm, bn, warps, stages)
        print(f"BEST {name}: {best}; plan() today {_time(sets, kc, vc):.1f} us", flush=True)


BNS, WARPS, STAGES = (32, 64, 128), (4, 8, 2), (2, 3, 4)


def decode_candidates(rows: int, programs_per_split: int, sms: int,
                      grid: tuple[tuple[int, ...], ...] = (BNS, WARPS, STAGES),
                      row_blocks: tuple[int, ...] = ()) -> list[tuple[int, int, int, int, int]]:
    """(BM, BN, warps, stages, splits) to try for `rows` rows a KV head: row blocks of 16, 32 (rows
    over 16) and the rows' power of two (or those of `row_blocks` that the rows need), and split counts
    that keep the grid within 24 programs an SM, where the unsplit grid has fewer programs than SMs
    (with a program an SM, every split measured slower on the H100)."""
    top = max(16, 1 << (rows - 1).bit_length())
    bms = sorted({16, top} | ({32} if rows > 16 else set()))
    if row_blocks:
        bms = [bm for bm in bms if bm in row_blocks]
    out = []
    for bm, bn, warps, stages in itertools.product(bms, *grid):
        if warps == 2 and bm > 16:
            continue
        blocks = -(-rows // bm)
        for s in SPLITS:
            if s == 1 or (programs_per_split * blocks < sms and programs_per_split * blocks * s <= 24 * sms):
                out.append((bm, bn, warps, stages, s))
    return out


def decode_case(queries: int, b: int, context: int, read_gbs: float, sms: int, deadline: float,
                grid: tuple[tuple[int, ...], ...], row_blocks: tuple[int, ...] = ()) -> dict:
    """Every candidate tile of one (queries, batch) case until `deadline`; the best (plan() if none beats it)."""
    rows = queries * HQ // HK
    name = f"{'decode' if queries == 1 else 'verify q4'} b{b} @{context}"
    kv_bytes = b * context * HK * D * 2 * 2
    kc, vc, sets = _attn_sets([(queries, context, None, queries > 1)] * b, measure.rotations(kv_bytes))
    ref = [tp.paged_attention(q, kc, vc, bt, 0.088) for q, bt in sets]
    served = tp.plan(b, HK, HQ // HK, queries, sms)
    served_us = _time(sets, kc, vc)
    floor = kv_bytes / read_gbs / 1e3
    print(f"{name}: plan() {served} {served_us:.1f} us, K/V floor {floor:.1f} us", flush=True)
    best = (served_us, served)
    for cand in decode_candidates(rows, b * HK, sms, grid, row_blocks):
        if time.time() > deadline:
            print(f"{name}: budget spent", flush=True)
            break
        outs = _under(cand, lambda: [tp.paged_attention(q, kc, vc, bt, 0.088) for q, bt in sets], f"{name}: {cand}")
        if outs is None:
            continue
        err = max(float((o.float() - r.float()).abs().max()) for o, r in zip(outs, ref))
        if err > 2e-2:
            print(f"{name}: {cand}: differs from plan() by {err:.3g}, dropped", flush=True)
            continue
        t = _under(cand, lambda: _time(sets, kc, vc), f"{name}: {cand}")
        if t is None:
            continue
        print(f"{name}: {cand}: {t:.1f} us ({floor / t:.0%} of the read floor)", flush=True)
        if t < best[0]:
            best = (t, cand)
    print(f"BEST {name}: {best[1]} {best[0]:.1f} us; plan() {served} {served_us:.1f} us; floor {floor:.1f} us",
          flush=True)
    return {"case": name, "num_seqs": b, "rows": rows, "tile": list(best[1]), "us": best[0],
            "plan_tile": list(served), "plan_us": served_us, "floor_us": floor}


def decode_sweep(batches: list[int], context: int, budget_s: float, write: Path | None,
                 grid: tuple[tuple[int, ...], ...] = (BNS, WARPS, STAGES), row_blocks: tuple[int, ...] = (),
                 queries: tuple[int, ...] = (4, 1)) -> list[dict]:
    deadline = time.time() + budget_s
    read_gbs = measure.measure_ceilings(None)["read_gbs"]
    sms = num_sms(torch.device("cuda"))
    # the largest batches first (they compile the candidates the smaller ones reuse), verify before decode
    cases = [(q, b) for b in sorted(batches, reverse=True) for q in queries]
    results = []
    for n, (q, b) in enumerate(cases):
        share = time.time() + (deadline - time.time()) / (len(cases) - n)
        results.append(decode_case(q, b, context, read_gbs, sms, share, grid, row_blocks))
        torch.cuda.empty_cache()
        if write is not None:  # after each case: a run cut short keeps what it measured
            write.write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=60)
    ap.add_argument("--decode", action="store_true", help="sweep the decode / verify tiles instead of extend")
    ap.add_argument("--batches", default="1,32,64")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--write", type=Path, help="(--decode) the best tile per (batch, rows) as JSON")
    ap.add_argument("--bn", help="(--decode) BLOCK_N values to try (default 32,64,128)")
    ap.add_argument("--warps", help="(--decode) warps to try (default 4,8,2; 2 only with 16-row blocks)")
    ap.add_argument("--stages", help="(--decode) pipeline stages to try (default 2,3,4)")
    ap.add_argument("--bm", help="(--decode) row blocks to try, of those the rows need (default 16, 32, their power of two)")
    ap.add_argument("--queries", default="4,1", help="(--decode) queries a sequence: 4 (verify), 1 (decode)")
    args = ap.parse_args()
    grid = tuple(tuple(int(x) for x in v.split(",")) if v else d
                 for v, d in ((args.bn, BNS), (args.warps, WARPS), (args.stages, STAGES)))
    if args.decode:
        decode_sweep([int(b) for b in args.batches.split(",")], args.context, args.budget_s, args.write, grid,
                     tuple(int(x) for x in args.bm.split(",")) if args.bm else (),
                     tuple(int(x) for x in args.queries.split(",")))
    else:
        extend_sweep(args.budget_s)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
