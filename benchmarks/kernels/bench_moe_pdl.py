"""Fused MoE with and without programmatic dependent launch (PDL), side by side in one run.

    python3 -m benchmarks.kernels.bench_moe_pdl [--m 1,8,64,4096] [--rounds 3]
        [--models air,glm45,air+shared,glm45+shared]

The fused MoE is three kernels (gate_up, down, combine; plus the alignment when T > 1). Launched
plainly, each waits for the previous one to finish and then pays its own launch and pipeline
ramp. With PDL (pdl.ENABLED) the next kernel's programs start on the SMs its predecessor
frees and wait in-kernel (griddepcontrol.wait) for its results. Each mode is timed by CUDA-graph
replay (measure.time_graph, two routings per graph), the modes interleaved over --rounds rounds,
median per mode reported with the target's measure: weight bytes / time against the read bandwidth
(M <= 64) or FLOP rate against the bf16 GEMM peak (M >= 1024). At M <= 64 the same number of bytes
is also read by one plain streaming kernel (the read-bandwidth probe), timed the same way: what a
single kernel of that size can reach, launch and ramp included. Each mode's output must equal the
plain launch's bit for bit (same kernels; only when they start changes).
With OUT set, the table goes to $OUT/bench_moe_pdl.md.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks import measure
from benchmarks.kernels.bench_kernels import MOE_MODELS as MODELS  # E routed, H, I_e, shared experts
from common.ops import pdl
from common.ops import triton_moe as tm

BF = torch.bfloat16
MODES = ("plain", "pdl")


def _point(ceil: dict, w13: torch.Tensor, w2: torch.Tensor, m: int, shared: int, rounds: int) -> dict:
    e_all, n2, h = w13.shape
    e, inter = e_all - shared, n2 // 2
    xs = [torch.randn(m, h, device="cuda", dtype=BF) for _ in range(2)]
    routes = [tm.grouped_topk(torch.randn(m, e, device="cuda"), torch.zeros(e, device="cuda"), 8, 1, 1, True, 1.0,
                              shared) for _ in range(2)]
    calls = [lambda i=i: tm.fused_moe(xs[i], w13, w2, *routes[i]) for i in range(2)]
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    outs = {}
    saved = pdl.ENABLED
    try:
        for _ in range(rounds):
            for mode in MODES:
                pdl.ENABLED = mode == "pdl"
                times[mode].append(measure.time_graph(calls))
                outs.setdefault(mode, calls[0]())
    finally:
        pdl.ENABLED = saved
    same = torch.equal(outs["pdl"], outs["plain"])
    used = torch.unique(routes[0][1]).numel()
    w_bytes = used * 3 * inter * h * 2
    flops = 2 * m * (8 + shared) * 3 * inter * h

    def scored(t: float) -> tuple[float, float]:  # (µs, the target's fraction at this M)
        return t, (w_bytes / (t * 1e3) / ceil["read_gbs"]) if m <= 64 else flops / (t * 1e6) / ceil["gemm_tflops"]

    row: dict = {"same": same, **{mode: scored(statistics.median(ts)) for mode, ts in times.items()}}
    if m <= 64:  # the same bytes read by one streaming kernel (two buffers, as the MoE rotates two routings)
        bufs = [torch.empty(w_bytes // 2, device="cuda", dtype=BF).normal_() for _ in range(2)]
        row["read"] = scored(measure.time_graph([measure.read_call(b) for b in bufs]))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,8,64,4096")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    info = measure.device_info()
    ceil = measure.measure_ceilings()
    print(f"{info['gpu']}, driver {info['driver']}, torch {info['torch']}, triton {info['triton']}")
    print(f"ceilings: read {ceil['read_gbs']:.0f} GB/s, bf16 GEMM {ceil['gemm_tflops']:.0f} TFLOP/s")
    if not pdl.supported(torch.device("cuda")):
        raise SystemExit("PDL needs compute capability 9.0 or newer")
    head = ("| shape | M | " + " | ".join(f"{m} µs (frac)" for m in MODES)
            + " | one read kernel over the weight bytes, µs (frac) | outputs equal |")
    lines = [head, "|" + "---|" * (4 + len(MODES))]
    print(lines[0])
    for model in args.models.split(","):
        e, h, inter, shared = MODELS[model]
        w13 = torch.randn(e + shared, 2 * inter, h, device="cuda", dtype=BF) / h**0.5
        w2 = torch.randn(e + shared, h, inter, device="cuda", dtype=BF) / inter**0.5
        for m in (int(v) for v in args.m.split(",")):
            row = _point(ceil, w13, w2, m, shared, args.rounds)
            cells = " | ".join(f"{row[mode][0]:.1f} ({row[mode][1]:.1%})" for mode in MODES)
            read = f"{row['read'][0]:.1f} ({row['read'][1]:.1%})" if "read" in row else "-"
            lines.append(f"| {model} | {m} | {cells} | {read} | {'yes' if row['same'] else 'NO'} |")
            print(lines[-1], flush=True)
        del w13, w2
        torch.cuda.empty_cache()
    print("frac: weight bytes / time over the read bandwidth at M <= 64, FLOP rate over the GEMM peak above")
    measure.write_out("bench_moe_pdl.md", f"{info['gpu']}, driver {info['driver']}; read {ceil['read_gbs']:.0f} GB/s, "
                      f"GEMM {ceil['gemm_tflops']:.0f} TFLOP/s\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
