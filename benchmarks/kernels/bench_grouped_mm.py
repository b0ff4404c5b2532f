"""Experiment: the fused Triton MoE against torch._grouped_mm (CUTLASS grouped GEMM) at prefill sizes.

    python3 -m benchmarks.kernels.bench_grouped_mm [--m 1024,2048,4096]

Model layout (routed top-8 + the shared expert stacked as expert E). The grouped_mm pipeline:
align to 16-row blocks (our kernel), gather x into expert order, grouped gate_up GEMM, silu_and_mul,
grouped down GEMM, then weight and combine per token. Prints both times, the GEMM-only time of the
grouped_mm pair, and their errors against the fp32 reference on the touched experts.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import measure
from common.ops import reference as ref
from common.ops import triton_moe as tm
from common.ops import triton_norm as tn

BF = torch.bfloat16


def grouped_moe(x, w13, w2, weights, ids):  # type: ignore[no-untyped-def]
    n_tok, hidden = x.shape
    e = w13.shape[0]
    k = ids.shape[1]
    numel = n_tok * k
    sorted_ids, block_expert = tm.align_block_size(ids, e, 16)
    counts = torch.zeros(e + 1, dtype=torch.int32, device=x.device)
    counts.scatter_add_(0, (block_expert.long() % (e + 1)), torch.full_like(block_expert, 16))  # -1 -> bin e
    offs = counts[:e].cumsum(0).to(torch.int32)
    rows = int(offs[-1])
    sid = sorted_ids[:rows].long()
    x_pad = torch.cat((x, x.new_zeros(1, hidden)))
    tok = torch.where(sid < numel, sid // k, n_tok)
    xs = x_pad[tok]  # [R,H] expert-sorted, padding rows zero
    gate_up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs)
    act = tn.silu_and_mul(gate_up)
    y = torch._grouped_mm(act, w2.transpose(1, 2), offs=offs)  # [R,H]
    flat_w = torch.cat((weights.reshape(-1), weights.new_zeros(1)))
    slot = torch.where(sid < numel, sid, numel)
    acc = torch.zeros(numel + 1, hidden, dtype=torch.float32, device=x.device)
    acc.index_add_(0, slot, y.float() * flat_w[slot, None])
    return acc[:numel].view(n_tok, k, hidden).sum(1).to(x.dtype), (xs, w13, w2, offs, act)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1024,2048,4096")
    args = ap.parse_args()
    torch.manual_seed(0)
    for name, (e, h, inter) in {"air+1": (128, 4096, 1408), "glm45+1": (160, 5120, 1536)}.items():
        w13 = torch.randn(e + 1, 2 * inter, h, device="cuda", dtype=BF) / h**0.5
        w2 = torch.randn(e + 1, h, inter, device="cuda", dtype=BF) / inter**0.5
        for m in (int(v) for v in args.m.split(",")):
            x = torch.randn(m, h, device="cuda", dtype=BF)
            weights, ids = tm.grouped_topk(torch.randn(m, e, device="cuda"), torch.zeros(e, device="cuda"), 8, 1, 1,
                                           True, 1.0, 1)
            args_ = (x, w13, w2, weights, ids)
            t_ours = measure.time_graph([lambda a=args_: tm.fused_moe(*a)], reps=10)
            out, (xs, _, _, offs, act) = grouped_moe(*args_)
            t_gmm = measure.time_eager(lambda a=args_: grouped_moe(*a), rep_ms=200)
            t_gemms = measure.time_eager(lambda g=(xs, act, w13, w2, offs): (
                torch._grouped_mm(g[0], g[2].transpose(1, 2), offs=g[4]),
                torch._grouped_mm(g[1], g[3].transpose(1, 2), offs=g[4])), rep_ms=200)
            used, remap = torch.unique(ids.long(), return_inverse=True)
            want = ref.fused_moe(x.float(), w13[used].float(), w2[used].float(), weights, remap.int())
            flops = 2 * m * 9 * 3 * inter * h
            print(f"{name} M={m}: fused Triton {t_ours:.0f} us ({flops / t_ours / 1e6:.0f} TFLOP/s, err "
                  f"{measure.rel_err(tm.fused_moe(x, w13, w2, weights, ids), want):.1e}); grouped_mm pipeline "
                  f"{t_gmm:.0f} us (err {measure.rel_err(out, want):.1e}), its two GEMMs alone {t_gemms:.0f} us "
                  f"({flops / t_gemms / 1e6:.0f} TFLOP/s)", flush=True)
            del want
            torch.cuda.empty_cache()


if __name__ == "__main__":
    with torch.inference_mode():
        main()
