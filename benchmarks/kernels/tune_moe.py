"""Tune the fused-MoE block configs on this GPU and write common/ops/moe_configs/*.json.

    python3 -m benchmarks.kernels.tune_moe                          # quick: Air + GLM-4.5 full width, 7 M values
    python3 -m benchmarks.kernels.tune_moe --tp 1,2,4,8 --m all     # everything (long: run per model/TP slice)
    python3 -m benchmarks.kernels.tune_moe --dtype fp8 --tp 1,2,4,8 # the FP8 kernel, per-channel scales
    python3 -m benchmarks.kernels.tune_moe --dtype fp8-block        # the FP8 kernel, 128 x 128 block scales

Shapes are the model's: the E routed experts plus --shared (default 1) shared experts stacked after
them, top-8 routed + the shared column per token (common/model/moe.py), so tables are keyed E+1.
--dtype picks the kernel and the table: bf16 (triton_moe, "dtype=bfloat16"), fp8 (triton_moe_fp8
with per-channel scales, "dtype=fp8_w8a8") or fp8-block (block scales, "dtype=fp8_w8a8_block128";
TP slices whose I is not a multiple of the block are skipped). For FP8 the gate_up time includes the
intermediate's quantisation (in the epilogue when the tile holds whole groups, else one more
launch), so both ways compete; candidates add swapped operands (small M) and, where I <= 256, tiles
that hold the whole row; block scales fix BLOCK_K to the block.

For each shape (E, H, I_e / tp) and token count M, random routing (grouped_topk on random logits)
and, for each BLOCK_M candidate, the gate_up and the down GEMM are timed separately (graph
replays, median) over a candidate list chosen by the rows each expert gets; the entry is the
BLOCK_M whose best gate_up + best down is fastest. Tables are merged into existing files (entries
for other M kept) in --out-dir and copied to $OUT/moe_configs when OUT is set. A time budget
stops starting new (shape, M) points; the heuristic in triton_moe.default_config covers the rest.
Candidates that do not fit the GPU (shared memory) are skipped.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import time
from pathlib import Path

import torch

from benchmarks import measure
from benchmarks.kernels.bench_moe_fp8 import fp8_experts
from common.ops import triton_moe as tm
from common.ops import triton_moe_fp8 as tf8
from common.ops.moe_configs import default_config_fp8

MODELS = {"air": (128, 4096, 1408), "glm45": (160, 5120, 1536)}  # E, H, I_e
QUICK_M = (1, 4096, 64, 1024, 8, 256, 32)  # most telling first: a budget cut keeps them
ALL_M = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024, 1536, 2048, 3072, 4096)
TOP_K = 8
SHARED = 1  # --shared: shared experts per token (stacked after the routed ones)
FP8_BLOCK: int | None = None  # --dtype: None = bf16 kernel, 0 = FP8 per-channel scales, b = FP8 b x b blocks
DTYPES = {"bf16": None, "fp8": 0, "fp8-block": 128}


def route(m: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random top-8 routing over the e - SHARED routed experts plus the shared column(s)."""
    return tm.grouped_topk(torch.randn(m, e - SHARED, device="cuda"), torch.zeros(e - SHARED, device="cuda"),
                           TOP_K, 1, 1, True, 1.0, SHARED)


def candidates(m: int, num_experts: int, inter: int) -> tuple[list[int], list[dict], list[dict]]:
    """(BLOCK_M values, gate_up candidates, down candidates), likely-best first."""
    per_expert = m * (TOP_K + SHARED) / num_experts
    if FP8_BLOCK is not None:
        return _fp8_candidates(per_expert, inter)

    def grid(bns, bks, warps, stages, groups, tmas=(False,)):  # type: ignore[no-untyped-def]
        return [{"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g, "num_warps": w, "num_stages": s, **({"tma": True} if t else {})}
                for t, n, k, w, s, g in itertools.product(tmas, bns, bks, warps, stages, groups)]

    if per_expert <= 4:  # a weight stream: short K loops (down: K = I) want deep pipelines and many programs
        # (weight tiles through the TMA engine as well: fewer load instructions per byte in flight)
        return ([16], grid((32, 16, 64), (64, 128, 256), (2, 4), (3, 4, 5), (1,), (False, True)),
                grid((64, 32, 128), (64, 128, 256), (2, 4), (3, 4, 5), (1,), (False, True)))
    if per_expert <= 48:
        return ([32, 64], grid((64, 128), (128, 64), (4,), (4, 3), (4,)),
                grid((64, 128), (128, 64), (4,), (4, 3), (4,)))
    big = [{"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "num_warps": w, "num_stages": s, "tma": tma}
           for tma in (True, False)
           for n, k, w, s in ((128, 64, 8, 3), (128, 64, 4, 4), (64, 64, 4, 4), (256, 64, 8, 3),
                              (128, 128, 8, 3), (128, 64, 8, 4), (256, 64, 8, 4))]
    return [64, 128], big, list(big)


def _fp8_candidates(per_expert: float, inter: int) -> tuple[list[int], list[dict], list[dict]]:
    """The FP8 kernel's candidates: K steps of 128-256 one-byte elements (block scales: the block),
    swapped operands where BLOCK_M < 64 (the weight rows then fill the 64-row MMA side: BLOCK_N >= 64),
    tiles holding whole quantisation groups (I <= 256: the row; block: the block) for gate_up."""
    bks = (FP8_BLOCK,) if FP8_BLOCK else (128, 256)
    whole = (FP8_BLOCK,) if FP8_BLOCK else (256,) if inter <= 256 else ()

    def grid(tiles, bns, warps, stages, groups, swaps, tmas):  # type: ignore[no-untyped-def]
        """Skips what cannot pay or fit: swaps with BLOCK_N < 64, stages of `tiles` weight tiles over
        ~220 KB of shared memory."""
        return [{"BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g, "num_warps": w, "num_stages": s, "swap": sw, "tma": t}
                for sw, t, n, k, w, s, g in itertools.product(swaps, tmas, bns, bks, warps, stages, groups)
                if not (sw and n < 64) and tiles * n * k * s <= 220 * 1024]

    if per_expert <= 4:
        return ([16], grid(2, (32, 16, 64, *whole), (4,), (3, 4, 5), (1,), (False, True), (False, True)),
                grid(1, (64, 32, 128), (4,), (3, 4, 5), (1,), (False, True), (False, True)))
    if per_expert <= 48:
        return ([16, 32, 64], grid(2, (64, 128, *whole), (4,), (3, 4), (4,), (False, True), (False,)),
                grid(1, (64, 128), (4,), (3, 4), (4,), (False, True), (False,)))
    big = [{"BLOCK_N": n, "BLOCK_K": FP8_BLOCK or k, "GROUP_M": 8, "num_warps": w, "num_stages": s, "tma": tma}
           for tma in (True, False)
           for n, k, w, s in ((128, 128, 8, 3), (128, 128, 4, 4), (64, 128, 4, 4), (256, 128, 8, 3),
                              (128, 256, 8, 2), (128, 128, 8, 4), (256, 128, 8, 2))
           if not (FP8_BLOCK and k != FP8_BLOCK)]
    return [64, 128], big, list(big)


def _gemm_call(part, cfg, bm, x, act, y, w13, w2, sorted_ids, block_expert, topw):  # type: ignore[no-untyped-def]
    if FP8_BLOCK is not None:  # x, act: (codes, scales); w13, w2: (weights, scales)
        if part == "up":
            return lambda: tf8.gate_up(*x, *w13, sorted_ids, block_expert, TOP_K + SHARED, FP8_BLOCK, torch.bfloat16,
                                       bm, cfg, False)
        return lambda: tf8.down(*act, *w2, y, sorted_ids, block_expert, topw, FP8_BLOCK, bm, cfg, False)
    numel, inter = act.shape
    h = x.shape[1]
    if part == "up":
        return lambda: tm._gemm(x, w13, act, sorted_ids, block_expert, topw, numel, inter, h, TOP_K + SHARED, True, bm,
                                cfg)
    return lambda: tm._gemm(act, w2, y, sorted_ids, block_expert, topw, numel, h, inter, 1, False, bm, cfg)


def tune_point(e: int, h: int, inter: int, m: int, deadline: float) -> dict | None:
    x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
    w13 = _weights.get((e, h, inter))
    w2 = _weights.get((e, h, inter, "down"))
    weights, ids = route(m, e)
    numel = m * (TOP_K + SHARED)
    act = torch.randn(numel, inter, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(numel, h, device="cuda", dtype=torch.bfloat16)
    if FP8_BLOCK is not None:  # the GEMMs' FP8 operands: (codes, scales)
        x, act = tf8.quantize(x, FP8_BLOCK), tf8.quantize(act, FP8_BLOCK)
    topw = weights.reshape(-1).contiguous()
    block_ms, ups, downs = candidates(m, e, inter)
    best: dict | None = None
    for bm in block_ms:
        if m == 1:  # fused_moe's one-token path: no alignment, one block per assignment
            sorted_ids, block_expert = None, ids.reshape(-1)
        else:
            sorted_ids, block_expert = tm.align_block_size(ids, e, bm)
        scores = {}
        for part, cands in (("up", ups), ("down", downs)):
            for cfg in cands:
                if time.time() > deadline and part in scores:
                    break
                call = _gemm_call(part, cfg, bm, x, act, y, w13, w2, sorted_ids, block_expert, topw)
                try:
                    t = measure.time_graph([call], reps=10)
                except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory
                    print(f"    skip {part} BM={bm} {cfg}: {type(exc).__name__}", flush=True)
                    continue
                if part not in scores or t < scores[part][0]:
                    scores[part] = (t, cfg)
        if "up" in scores and "down" in scores:
            total = scores["up"][0] + scores["down"][0]
            print(f"    M={m} BM={bm}: best up {scores['up'][0]:.1f} us, down {scores['down'][0]:.1f} us", flush=True)
            if best is None or total < best["us"]["total"]:
                best = {"BLOCK_M": bm, "up": scores["up"][1], "down": scores["down"][1],
                        "us": {"up": round(scores["up"][0], 2), "down": round(scores["down"][0], 2),
                               "total": round(total, 2)}}
    return best


_weights: dict = {}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="air,glm45")
    ap.add_argument("--tp", default="1", help="comma list of TP degrees (I_e / tp)")
    ap.add_argument("--m", default="quick", help="'quick', 'all' or a comma list")
    ap.add_argument("--budget-s", type=float, default=1e9)
    ap.add_argument("--out-dir", type=Path, default=tm.CONFIG_DIR)
    ap.add_argument("--shared", type=int, default=1, help="shared experts stacked after the routed ones")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="the kernel (and table) to tune")
    args = ap.parse_args()
    global SHARED, FP8_BLOCK
    SHARED, FP8_BLOCK = args.shared, DTYPES[args.dtype]
    deadline = time.time() + args.budget_s
    ms = QUICK_M if args.m == "quick" else ALL_M if args.m == "all" else tuple(int(v) for v in args.m.split(","))
    name = torch.cuda.get_device_name(0)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = measure.out_dir()
    print(f"tuning {args.dtype} on {name}; M = {ms}", flush=True)
    shapes = [(model, tp_deg, MODELS[model][0] + SHARED, MODELS[model][1], MODELS[model][2] // tp_deg)
              for tp_deg in (int(v) for v in args.tp.split(",")) for model in args.models.split(",")]
    if FP8_BLOCK:
        skipped = [f"{model} tp={tp_deg}" for model, tp_deg, _, _, inter in shapes if inter % FP8_BLOCK]
        print(f"  block scales need I % {FP8_BLOCK} == 0: skipping {skipped}", flush=True)
        shapes = [shape for shape in shapes if shape[4] % FP8_BLOCK == 0]
    for _, _, e, h, inter in shapes:  # every shape's weights stay resident (M-major order below)
        if FP8_BLOCK is None:
            _weights[(e, h, inter)] = torch.randn(e, 2 * inter, h, device="cuda", dtype=torch.bfloat16) / h**0.5
            _weights[(e, h, inter, "down")] = torch.randn(e, h, inter, device="cuda", dtype=torch.bfloat16) / inter**0.5
        else:
            _weights[(e, h, inter)] = fp8_experts(e, 2 * inter, h, FP8_BLOCK)
            _weights[(e, h, inter, "down")] = fp8_experts(e, h, inter, FP8_BLOCK)
    for m in ms:  # M-major, so a budget cut leaves every shape with its most telling points
        for model, tp_deg, e, h, inter in shapes:
            if time.time() > deadline:
                print(f"  budget reached before {model} tp={tp_deg} M={m}", flush=True)
                return
            t0 = time.time()
            best = tune_point(e, h, inter, m, deadline)
            if best is None:
                continue
            heur = (tm.default_config(m, e, 2 * inter, h, TOP_K + SHARED) if FP8_BLOCK is None
                    else default_config_fp8(m, e, 2 * inter, h, TOP_K + SHARED, FP8_BLOCK))
            print(f"  {model} tp={tp_deg} (E={e} H={h} I={inter}) M={m}: BM={best['BLOCK_M']} "
                  f"up={best['up']} down={best['down']} {best['us']} (heuristic BM={heur['BLOCK_M']}) "
                  f"[{time.time() - t0:.0f} s]", flush=True)
            path = args.out_dir / tm.config_name(e, 2 * inter, h, torch.bfloat16, name, FP8_BLOCK)
            table = json.loads(path.read_text()) if path.is_file() else {}
            table[str(m)] = best
            rows = sorted(table.items(), key=lambda kv: int(kv[0]))
            path.write_text("{\n" + ",\n".join(f' "{k}": {json.dumps(v)}' for k, v in rows) + "\n}\n")
            if out:
                (out / "moe_configs").mkdir(exist_ok=True)
                shutil.copy(path, out / "moe_configs" / path.name)


if __name__ == "__main__":
    main()
