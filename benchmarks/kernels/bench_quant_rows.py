"""The per-token FP8 quantiser (`triton_fp8.quant_fp8_per_token`) at the shapes the model gives it,
over its launch choices: the row block (one pass when it covers the row, else two: the amax, then the
codes from a second read that mostly hits L2) and the warps a row; and the fused residual add + RMSNorm +
quantiser over the warps a row. Every choice is checked bit-equal
(codes and scales) to the served one and timed by graph replay against the bytes floor (bf16 read,
codes + scale written, at the measured copy bandwidth).

    python -m benchmarks.kernels.bench_quant_rows [--shapes 8192x12288,64x12288] [--out f.json]

The shapes: Air's and GLM-4.5's attention output (12288 wide) at an 8K prefill, a verify batch and
one token; Air's hidden (4096) at an 8K prefill.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import triton

from benchmarks import measure
from common.ops import triton_fp8 as tf
from common.ops.pdl import pdl_kwargs
from common.ops.reference import FP8_AMAX_FLOOR, FP8_MAX

DEFAULT_SHAPES = "8192x12288,256x12288,1x12288,8192x4096,73728x1408,2304x1408,9x1408"
NORM_SHAPES = "8192x4096,256x4096,1x4096,8192x5120"
NORM_WARPS = (4, 8, 16)
CHOICES = [(16384, 16), (8192, 8), (8192, 16), (4096, 4), (4096, 8), (2048, 2), (2048, 4), (2048, 8), (1024, 2),
           (1024, 4), (512, 2)]


def launch(x: torch.Tensor, block: int, warps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-token kernel with an explicit row block and warps (the served call picks its own)."""
    n_tok, k = x.shape
    q = torch.empty(n_tok, k, dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(n_tok, 1, dtype=torch.float32, device=x.device)
    tf._quant_per_token_kernel[(n_tok,)](
        x, q, scale, k, x.stride(0), q.stride(0), QMAX=FP8_MAX, FLOOR=FP8_AMAX_FLOOR, HW=tf.hw_round(x.device),
        BLOCK=block, num_warps=warps, **pdl_kwargs(x.device))
    return q, scale


def bench_shape(n_tok: int, k: int, copy_gbs: float) -> list[dict]:
    nbytes = n_tok * k * 2 + n_tok * k + n_tok * 4
    sets = measure.rotations(nbytes)
    xs = [torch.randn(n_tok, k, device="cuda").to(torch.bfloat16) * 3 for _ in range(sets)]
    want = tf.quant_fp8_per_token(xs[0])
    served = measure.time_graph([lambda x=x: tf.quant_fp8_per_token(x) for x in xs])
    floor = nbytes / (copy_gbs * 1e3)
    rows = [{"shape": f"{n_tok}x{k}", "choice": "served", "us": served, "floor_us": floor, "equal": True}]
    for block, warps in CHOICES:
        if block > triton.next_power_of_2(k) or block * 8 < k:
            continue  # a block past the row, or more than 8 loads a pass
        got = launch(xs[0], block, warps)
        equal = bool(torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8)) and torch.equal(got[1], want[1]))
        us = measure.time_graph([lambda x=x, b=block, w=warps: launch(x, b, w) for x in xs])
        rows.append({"shape": f"{n_tok}x{k}", "choice": f"block {block}, {warps} warps"
                     f"{'' if block >= k else ', two passes'}", "us": us, "floor_us": floor, "equal": equal})
    return rows


def bench_norm(n_tok: int, h: int, copy_gbs: float) -> list[dict]:
    """fused_add_rms_norm_quant_fp8 (the norm before q/k/v and the MoE) at each warps count: x and the
    residual read, the new residual and the codes written."""
    nbytes = n_tok * h * (2 + 2 + 2 + 1) + n_tok * 4
    sets = measure.rotations(nbytes)
    xs = [torch.randn(n_tok, h, device="cuda").to(torch.bfloat16) for _ in range(2 * sets)]
    w = torch.rand(h, device="cuda").to(torch.bfloat16) + 0.5
    want = tf.fused_add_rms_norm_quant_fp8(xs[0], xs[1], w, 1e-5)
    floor = nbytes / (copy_gbs * 1e3)
    served = measure.time_graph([lambda i=i: tf.fused_add_rms_norm_quant_fp8(xs[2 * i], xs[2 * i + 1], w, 1e-5)
                                 for i in range(sets)])
    rows = [{"shape": f"{n_tok}x{h}", "choice": "norm+quant served", "us": served, "floor_us": floor, "equal": True}]
    saved = tf._row_warps
    try:
        for warps in NORM_WARPS:
            tf._row_warps = lambda _block, w_=warps: w_
            got = tf.fused_add_rms_norm_quant_fp8(xs[0], xs[1], w, 1e-5)
            equal = all(torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                                    b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)
                        for a, b in zip(got[:3], want[:3]))
            us = measure.time_graph([lambda i=i: tf.fused_add_rms_norm_quant_fp8(xs[2 * i], xs[2 * i + 1], w, 1e-5)
                                     for i in range(sets)])
            rows.append({"shape": f"{n_tok}x{h}", "choice": f"norm+quant, {warps} warps", "us": us, "floor_us": floor,
                         "equal": equal})
    finally:
        tf._row_warps = saved
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--norm-shapes", default=NORM_SHAPES)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    ceil = measure.measure_ceilings()
    print(f"# per-token quantiser launch choices, {torch.cuda.get_device_name()}, copy {ceil['copy_gbs']:.0f} GB/s")
    print("| shape | choice | µs | floor µs | floor / time | bit-equal |\n|---|---|---|---|---|---|")
    rows = []
    jobs = [(bench_shape, shape) for shape in args.shapes.split(",") if shape]
    jobs += [(bench_norm, shape) for shape in args.norm_shapes.split(",") if shape]
    for bench, shape in jobs:
        n_tok, k = (int(v) for v in shape.split("x"))
        for r in bench(n_tok, k, ceil["copy_gbs"]):
            rows.append(r)
            print(f"| {r['shape']} | {r['choice']} | {r['us']:.1f} | {r['floor_us']:.1f} | "
                  f"{r['floor_us'] / r['us']:.0%} | {r['equal']} |", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "ceilings": ceil, "rows": rows},
                                       indent=1))


if __name__ == "__main__":
    main()
