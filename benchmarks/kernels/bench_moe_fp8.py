"""FP8 fused MoE (per-channel and 128 x 128 block scales) against the bf16 fused MoE, at GLM-4.5-Air
and GLM-4.5 shapes, full width and the TP 2/4/8 slices, in one run.

    python3 -m benchmarks.kernels.bench_moe_fp8 [--models air,glm45] [--tp 1,8,2,4]
        [--m 1,8,32,64,256,2048,4096] [--budget-s 480] [--out result.json] [--rows-ab]

Shapes are the model's: E routed experts plus the shared one stacked after them, top-8 + the shared
column per token, I_e / tp (common/model/moe.py). For each shape and token count M, three ops are
timed by CUDA-graph replay (measure.time_graph; tuned tables or the heuristics): bf16 `fused_moe`,
`fused_moe_fp8` with per-channel scales and with block scales (where I_e / tp is a multiple of 128).
Input sets rotate (activations, routing, and which physical experts the stack starts at, so the
shared expert too is a different one each call) until a graph's calls read >= 4x L2 of weights.
Reported per op: µs; GB/s over the bytes it must read (the weights of the distinct experts the
routing hits — E4M3 codes and their fp32 scales, or bf16 — plus the activations, averaged over the
sets) and that over the measured HBM read bandwidth; TFLOP/s (2 * M * 9 * 3 * I * H) over the FP8
GEMM peak measured in this run (torch._scaled_mm 8192^3, per-tensor scales, fast accumulation;
bf16 rows over the bf16 GEMM peak); speedup over bf16; the relative error against the torch twin.
The FP8 rows also give the time of the activation quantisation alone (x per token or per group),
what fusing it into the RMSNorm before the MoE would save. Targets (issue 16): M <= 64 >= 90 % of
read bandwidth on the FP8 bytes (~1.8x bf16); M >= 2048 >= 55 % of the FP8 peak.
Tables print as they finish; with OUT set they go to $OUT/bench_moe_fp8.md, with --out to a JSON
file (device, ceilings, rows).
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path

import torch
import triton

from benchmarks import measure
from common.ops import reference as ref
from common.ops import triton_moe as tm
from common.ops import triton_moe_fp8 as tf8

MODELS = {"air": (128, 4096, 1408), "glm45": (160, 5120, 1536)}  # E routed, H, I_e
TOP_K, SHARED, BLOCK = 8, 1, 128
OPS = ("bf16", "fp8", "fp8-block")
COLS = ("shape", "M", "op", "us", "GB/s", "read_frac", "TFLOP/s", "peak_frac", "x_bf16", "xquant_us", "rel_err")


def fp8_experts(e: int, n: int, k: int, block: int, device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian [e, n, k] weights (/ sqrt(k)) as a checkpoint stores them: E4M3 codes and fp32 scales,
    amax / 448 per output row (block 0: [e, n, 1]) or per block x block tile ([e, n/b, k/b]); made a
    few experts at a time."""
    codes = torch.empty(e, n, k, dtype=torch.float8_e4m3fn, device=device)
    scales = torch.empty((e, n, 1) if not block else (e, n // block, k // block), device=device)
    step = max(1, (1 << 28) // (n * k))  # ~1 GB of fp32 at a time
    for lo in range(0, e, step):
        w = torch.randn(min(step, e - lo), n, k, device=device) / k**0.5
        if block:
            tiles = w.view(w.shape[0], n // block, block, k // block, block)
            s = tiles.abs().amax((2, 4)) / 448
            codes[lo : lo + step] = (tiles / s[:, :, None, :, None]).view_as(w).to(torch.float8_e4m3fn)
        else:
            s = w.abs().amax(-1, keepdim=True) / 448
            codes[lo : lo + step] = (w / s).to(torch.float8_e4m3fn)
        scales[lo : lo + step] = s
        del w
    return codes, scales


def fp8_gemm_peak(size: int = 8192) -> float:
    """TFLOP/s of torch._scaled_mm at size^3 (E4M3, per-tensor scales, bf16 out, fast accumulation)."""
    a = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
    one = torch.ones((), device="cuda")

    def call() -> torch.Tensor:
        return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16, use_fast_accum=True)

    return 2 * size**3 / triton.testing.do_bench(call, warmup=100, rep=500, return_mode="median") / 1e9


class Shape:
    """One model shape's weights in the three formats, with `sets` extra experts at the end of each
    stack: set s uses experts [s, s + E + 1), so every set reads a different physical shared expert."""

    def __init__(self, model: str, tp: int, sets: int) -> None:
        e, self.h, inter = MODELS[model]
        self.e, self.inter, self.sets = e, inter // tp, sets
        self.name = f"{model} tp{tp} (E={e}+{SHARED} H={self.h} I={self.inter})"
        total = e + SHARED + sets - 1
        h, i = self.h, self.inter
        bf = (torch.randn(total, 2 * i, h, device="cuda", dtype=torch.bfloat16) / h**0.5,
              torch.randn(total, h, i, device="cuda", dtype=torch.bfloat16) / i**0.5)
        self.weights: dict[str, tuple] = {"bf16": bf}
        for op, block in (("fp8", 0), ("fp8-block", BLOCK)):
            if not block or i % block == 0:
                self.weights[op] = (*fp8_experts(total, 2 * i, h, block), *fp8_experts(total, h, i, block))

    def view(self, op: str, s: int) -> tuple:
        """Set s's expert stack: E + 1 experts starting at s (contiguous views, built once per set)."""
        return tuple(t[s : s + self.e + SHARED] for t in self.weights[op])

    def expert_bytes(self, op: str) -> float:
        """Bytes one expert's gate_up and down weights (and scales) occupy in this format."""
        per = 3 * self.inter * self.h
        if op == "bf16":
            return 2 * per
        scales = 2 * self.inter + self.h if op == "fp8" else 3 * (self.inter // BLOCK) * (self.h // BLOCK)
        return per + 4 * scales


def point(shape: Shape, m: int, ceil: dict, ops: tuple[str, ...] = OPS) -> list[dict]:
    """Every op at M tokens: one row each. fp8-rows32: the per-channel FP8 op with its per-assignment
    down rows in fp32 instead of bf16 (what the combine reads)."""
    e, h, inter = shape.e, shape.h, shape.inter
    k = TOP_K + SHARED
    sets = min(shape.sets, measure.rotations(min(m * k, e + SHARED) * shape.expert_bytes("fp8")))
    xs = [torch.randn(m, h, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
    routes = [tm.grouped_topk(torch.randn(m, e, device="cuda"), torch.zeros(e, device="cuda"), TOP_K, 1, 1, True,
                              1.0, SHARED) for _ in range(sets)]
    hit = sum(torch.unique(ids).numel() for _, ids in routes) / sets
    views = {op: [shape.view(op, s) for s in range(sets)] for op in shape.weights}
    flops = 2 * m * k * 3 * inter * h
    rows, t_bf16 = [], None
    for op in ops:
        wop = "fp8" if op == "fp8-rows32" else op
        if wop not in shape.weights:
            continue
        block = BLOCK if op == "fp8-block" else 0
        if op == "bf16":
            calls = [lambda s=s: tm.fused_moe(xs[s], *views["bf16"][s], *routes[s]) for s in range(sets)]
        else:
            calls = [lambda s=s, wop=wop, block=block: tf8.fused_moe_fp8(xs[s], *views[wop][s], *routes[s], block)
                     for s in range(sets)]
        tf8.ROWS_DTYPE = torch.float32 if op == "fp8-rows32" else None
        try:
            t = measure.time_graph(calls)
        finally:
            tf8.ROWS_DTYPE = None
        read = hit * shape.expert_bytes(wop) + m * h * 2
        peak = ceil["gemm_tflops"] if op == "bf16" else ceil["fp8_tflops"]
        row = {"shape": shape.name, "M": m, "op": op, "us": round(t, 2), "GB/s": round(read / (t * 1e3), 1),
               "read_frac": round(read / (t * 1e3) / ceil["read_gbs"], 3), "TFLOP/s": round(flops / (t * 1e6), 1),
               "peak_frac": round(flops / (t * 1e6) / peak, 3), "experts_hit": round(hit, 1),
               "read_mb": round(read / 1e6, 1)}
        if op == "bf16":
            t_bf16 = t
        else:
            row["x_bf16"] = round(t_bf16 / t, 2) if t_bf16 else None
            row["xquant_us"] = round(measure.time_graph([lambda s=s, b=block: tf8.quantize(xs[s], b)
                                                         for s in range(sets)]), 2)
            w13, s13, w2, s2 = views[wop][0]
            want = ref.fused_moe_fp8(xs[0], w13, s13, w2, s2, *routes[0], block)
            row["rel_err"] = f"{measure.rel_err(calls[0](), want):.2e}"
            del want
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="air,glm45")
    ap.add_argument("--tp", default="1,8,2,4", help="TP degrees, outer loop (a budget cut drops the last)")
    ap.add_argument("--m", default="1,8,32,64,256,2048,4096")
    ap.add_argument("--budget-s", type=float, default=480.0, help="stop starting new points after this")
    ap.add_argument("--out", type=Path, help="write the rows, device and ceilings as JSON here")
    ap.add_argument("--rows-ab", action="store_true",
                    help="also time the per-channel FP8 op with fp32 per-assignment rows (op fp8-rows32)")
    args = ap.parse_args()
    ops = (*OPS, "fp8-rows32") if args.rows_ab else OPS
    deadline = time.time() + args.budget_s
    info = measure.device_info()
    ceil = measure.measure_ceilings() | {"fp8_tflops": fp8_gemm_peak()}
    print(f"{info['gpu']}, driver {info['driver']}, torch {info['torch']}, triton {info['triton']}")
    print(f"ceilings: read {ceil['read_gbs']:.0f} GB/s, bf16 GEMM {ceil['gemm_tflops']:.0f} TFLOP/s, "
          f"FP8 GEMM {ceil['fp8_tflops']:.0f} TFLOP/s", flush=True)
    ms = [int(v) for v in args.m.split(",")]
    lines = ["| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    print(lines[0], flush=True)
    rows: list[dict] = []
    for tp in (int(v) for v in args.tp.split(",")):
        for model in args.models.split(","):
            if time.time() > deadline:
                break
            _, h, inter = MODELS[model]
            sets = measure.rotations(min(ms) * (TOP_K + SHARED) * 3 * (inter // tp) * h)
            shape = Shape(model, tp, sets)
            for m in ms:
                if time.time() > deadline:
                    print(f"budget reached before {shape.name} M={m}", flush=True)
                    break
                try:
                    new = point(shape, m, ceil, ops)
                except Exception:  # noqa: BLE001 - keep measuring the rest
                    print(f"{shape.name} M={m}: ERROR\n{traceback.format_exc()}", flush=True)
                    continue
                rows += new
                for row in new:
                    lines.append("| " + " | ".join(str(row.get(c, "")) for c in COLS) + " |")
                    print(lines[-1], flush=True)
            del shape
            torch.cuda.empty_cache()
    note = ("read_frac: bytes the op must read / time over the HBM read bandwidth (target >= 0.9 at M <= 64); "
            "peak_frac: FLOP rate over the GEMM peak of its dtype (FP8 target >= 0.55 at M >= 2048)")
    print(note)
    head = (f"{info['gpu']}, driver {info['driver']}; read {ceil['read_gbs']:.0f} GB/s, bf16 GEMM "
            f"{ceil['gemm_tflops']:.0f} TFLOP/s, FP8 GEMM {ceil['fp8_tflops']:.0f} TFLOP/s\n\n")
    measure.write_out("bench_moe_fp8.md", head + "\n".join(lines) + f"\n\n{note}\n")
    if args.out:
        args.out.write_text(json.dumps({"device": info, "ceilings": ceil, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
