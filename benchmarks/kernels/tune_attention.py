"""Sweep the extend/prefill tiles of the Triton paged attention on this GPU.

    python3 -m benchmarks.kernels.tune_attention [--budget-s 60]

For 1x2048 (no prefix) and 1x2048 after a 4K prefix (96 q heads, 8 KV heads, head 128, page 16),
times paged_attention with each (BLOCK_M rows, BLOCK_N, num_warps, num_stages) candidate in place
of triton_paged.plan()'s extend choice (CUDA-graph replays, median), prints each with its
fraction of the FLOP roofline, and the best. The winner goes into plan() by hand.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from benchmarks import measure
from benchmarks.kernels.bench_kernels import _attn_sets
from common.attention import triton_paged as tp

CASES = {"extend 1x2048": [(2048, 2048, 0, False)], "extend 1x2048 after 4K": [(2048, 6144, None, False)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=60)
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    ceil = measure.measure_ceilings(None)
    original = tp.plan
    cands = list(itertools.product((128, 64), (64, 128, 32), (8, 4), (2, 3, 4)))
    for name, spec in CASES.items():
        kc, vc, sets = _attn_sets(spec, 2)
        q_len, seq_len = spec[0][0], spec[0][1]
        prefix = seq_len - q_len
        flops = 4 * 96 * 128 * (q_len * prefix + q_len * (q_len + 1) / 2)
        best = None
        for bm, bn, warps, stages in cands:
            if time.time() > deadline:
                break
            tp.plan = lambda *a, c=(bm, bn, warps, stages): (*c, 1)  # type: ignore[assignment]
            try:
                t = measure.time_graph([lambda q=q, b=b, kc=kc, vc=vc: tp.paged_attention(q, kc, vc, b, 0.088)
                                   for q, b in sets], reps=10)
            except Exception as exc:  # noqa: BLE001 - a tile that does not fit
                print(f"{name}: BM={bm} BN={bn} w={warps} s={stages}: {type(exc).__name__}", flush=True)
                continue
            finally:
                tp.plan = original
            frac = flops / (t * 1e6) / ceil["gemm_tflops"]
            print(f"{name}: BM={bm} BN={bn} w={warps} s={stages}: {t:.1f} us, {flops / t / 1e6:.0f} TFLOP/s "
                  f"({frac:.0%} of peak)", flush=True)
            if best is None or t < best[0]:
                best = (t, bm, bn, warps, stages)
        default = measure.time_graph([lambda q=q, b=b, kc=kc, vc=vc: tp.paged_attention(q, kc, vc, b, 0.088)
                                 for q, b in sets], reps=10)
        print(f"BEST {name}: {best}; plan() today {default:.1f} us", flush=True)


if __name__ == "__main__":
    with torch.inference_mode():
        main()
