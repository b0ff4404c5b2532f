"""Router logits for many tokens: triton_router.router_logits_mma against F.linear(x.float(), w).

    python3 -m benchmarks.kernels.bench_router

Prints GPU, driver and the measured read bandwidth, then for the Air (E128 H4096) and GLM-4.5
(E160 H5120) router shapes and T in 8, 64, 512, 2048, 4096: the kernel's time (split and three
bf16 dots, partial-sum reduction included), the fp32 reference's time (x copied to fp32, then
the cuBLAS fp32 GEMM), the bytes floor (x bf16 + w fp32 read once, over the measured read
bandwidth), and both relative errors vs the fp64 product on fresh random data. Times are medians
of CUDA-graph replays over rotated input sets (benchmarks.measure.time_graph). With OUT set, the table
also goes to $OUT/bench_router.md.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from benchmarks import measure
from common.ops import triton_router as tr

SHAPES = {"air": (128, 4096), "glm45": (160, 5120)}
TOKENS = (8, 64, 512, 2048, 4096)
COLS = ("shape", "T", "plan (BE,BT,BK,S,warps,stages)", "mma_us", "linear_us", "floor_us", "speedup",
        "mma_rel_err", "linear_rel_err")


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    info = measure.device_info()
    out = measure.out_dir()
    ceil = measure.measure_ceilings(out / "ceilings.json" if out else None)
    head = (f"GPU {info['gpu']} | driver {info['driver']} | SMs {info['sms']} | torch {info['torch']} | "
            f"triton {info['triton']} | CUDA {info['cuda']} | read {ceil['read_gbs']:.0f} GB/s")
    print(head)
    print(" | ".join(COLS), flush=True)
    lines = [head, "", "| " + " | ".join(COLS) + " |", "|" + "---|" * len(COLS)]
    for name, (n_exp, hidden) in SHAPES.items():
        for n_tok in TOKENS:
            nbytes = n_tok * hidden * 2 + n_exp * hidden * 4
            sets = [(torch.randn(n_tok, hidden, device="cuda", dtype=torch.bfloat16),
                     torch.randn(n_exp, hidden, device="cuda") / hidden**0.5)
                    for _ in range(measure.rotations(nbytes))]
            t_mma = measure.time_graph([lambda x=x, w=w: tr.router_logits_mma(x, w) for x, w in sets])
            t_lin = measure.time_graph([lambda x=x, w=w: F.linear(x.float(), w) for x, w in sets])
            x, w = sets[0]
            want = x.double() @ w.double().T
            err_mma = measure.rel_err(tr.router_logits_mma(x, w), want)
            err_lin = measure.rel_err(F.linear(x.float(), w), want)
            floor = nbytes / (ceil["read_gbs"] * 1e3)
            row = (f"{name} E{n_exp} H{hidden}", n_tok, tr.plan(n_tok, n_exp, hidden, info["sms"]),
                   f"{t_mma:.1f}", f"{t_lin:.1f}", f"{floor:.1f}", f"{t_lin / t_mma:.1f}x", f"{err_mma:.1e}",
                   f"{err_lin:.1e}")
            print(" | ".join(map(str, row)), flush=True)
            lines.append("| " + " | ".join(map(str, row)) + " |")
            del sets, x, w, want
            torch.cuda.empty_cache()
    if out:
        (out / "bench_router.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
