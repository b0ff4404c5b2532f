"""Fused MoE at prefill sizes: A operands in sorted block order, by TMA, warp-specialised loops.

    python benchmarks/bench_moe_blocked.py [--m 2048,4096] [--models glm45+shared,air+shared] [--budget-s 400]

The shipped grouped GEMMs gather their A rows with pointer loads (gate_up: x[token]; down: act by
assignment) and take only the weight tiles through TMA. Two layouts change that:
- "act in block order": gate_up writes act row r of block b at b*BM + r, so the down GEMM reads
  whole [BM, BK] tiles of it by TMA;
- "x in block order": a row-gather kernel copies x into block order first (its cost is reported
  and charged to gate_up), so gate_up too has both operands by TMA.
With both operands by TMA, Triton's Hopper warp-specialisation pass can run the K loop as one
producer warp group issuing the copies and two consumer groups on the tensor cores ("ws").

Per (model, M), each GEMM variant is timed alone (CUDA-graph replay, two routings) and checked
against the shipped table's output (max |diff|); then the whole fused_moe with the table's config
and with the best gate_up + best down found here, side by side. Fractions: FLOP rate (useful rows
only) over this run's measured bf16 GEMM peak, the issue's measure at M >= 1024.
With OUT set, the tables go to $OUT/bench_moe_blocked.md and the best configs to
$OUT/moe_blocked_best.json.
"""

from __future__ import annotations

import argparse
import json
import time

import gpu_timing as gt
import torch
from bench_kernels import MOE_MODELS as MODELS  # E routed, H, I_e, shared experts
from tune_moe import ws_configs

from common.ops import triton_moe as tm

BF = torch.bfloat16
TOP_K = 8


def _up_variants(table: dict) -> list[tuple[str, dict, bool]]:
    """(name, config, x in block order)."""
    out = [("table", table, False)]
    for c in ws_configs(((128, 3), (64, 4), (128, 4), (64, 3))):
        out.append((f"x-blocked ws BN{c['BLOCK_N']} s{c['num_stages']}", c, True))
    out.append(("x-blocked BN128 s3 (no ws)", {"BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8,
                                               "num_stages": 3, "tma": True, "a_tma": True}, True))
    return out


def _down_variants(table: dict) -> list[tuple[str, dict]]:
    out = [("table", table), ("table tile, act blocked", {**table, "a_tma": True})]
    for c in ws_configs(((256, 3), (128, 4), (256, 4), (128, 5))):
        out.append((f"act-blocked ws BN{c['BLOCK_N']} s{c['num_stages']}", c))
    return out


class Point:
    """Buffers of one (shape, M, BLOCK_M): two routings, aligned, with flat and block-order act."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, m: int, shared: int, bm: int):
        e_all, n2, self.h = w13.shape
        self.inter, self.w13, self.w2, self.bm = n2 // 2, w13, w2, bm
        self.k = TOP_K + shared
        self.numel = m * self.k
        self.xs = [torch.randn(m, self.h, device="cuda", dtype=BF) for _ in range(2)]
        self.routes = [tm.grouped_topk(torch.randn(m, e_all - shared, device="cuda"),
                                       torch.zeros(e_all - shared, device="cuda"), TOP_K, 1, 1, True, 1.0, shared)
                       for _ in range(2)]
        self.aligned = [tm.align_block_size(r[1], e_all, bm) for r in self.routes]
        rows = self.aligned[0][0].shape[0]
        self.x_blocked = [self.gather(i) for i in range(2)]
        self.act = [torch.empty(self.numel, self.inter, device="cuda", dtype=BF) for _ in range(2)]
        self.act_blocked = [torch.zeros(rows, self.inter, device="cuda", dtype=BF) for _ in range(2)]
        self.y = [torch.empty(self.numel, self.h, device="cuda", dtype=BF) for _ in range(2)]
        self.topw = [r[0].reshape(-1).float().contiguous() for r in self.routes]
        plain = {"BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
        for i in range(2):  # the act of both layouts, from the plain gate_up
            for act_blocked in (False, True):
                self.up(i, plain, False, act_blocked)

    def gather(self, i: int) -> torch.Tensor:
        return tm.gather_rows(self.xs[i], *self.aligned[i], self.k, self.bm)

    def up(self, i: int, cfg: dict, x_blocked: bool, act_blocked: bool) -> torch.Tensor:
        sorted_ids, block_expert = self.aligned[i]
        out = self.act_blocked[i] if act_blocked else self.act[i]
        a = self.x_blocked[i] if x_blocked else self.xs[i]
        tm._gemm(a, self.w13, out, sorted_ids, block_expert, self.topw[i], self.numel, self.inter, self.h, self.k,
                 True, self.bm, cfg, sorted_out=act_blocked, a_sorted=x_blocked)
        return out

    def down(self, i: int, cfg: dict) -> torch.Tensor:
        sorted_ids, block_expert = self.aligned[i]
        blocked = bool(cfg.get("a_tma"))
        a = self.act_blocked[i] if blocked else self.act[i]
        tm._gemm(a, self.w2, self.y[i], sorted_ids, block_expert, self.topw[i], self.numel, self.h, self.inter, 1,
                 False, self.bm, cfg, a_sorted=blocked)
        return self.y[i]


def _bench_point(ceil: dict, model: str, w13: torch.Tensor, w2: torch.Tensor, m: int, shared: int,
                 deadline: float) -> tuple[list[str], dict | None]:
    e_all, n2, h = w13.shape
    inter = n2 // 2
    table = tm.get_config(m, e_all, n2, h, TOP_K + shared, BF, torch.device("cuda"))
    flops_up = 2 * m * (TOP_K + shared) * 2 * inter * h
    flops_down = flops_up / 2
    peak = ceil["gemm_tflops"]
    lines: list[str] = []

    def row(part: str, name: str, us: float, flops: float, diff: float | str) -> None:
        tf = flops / (us * 1e6)
        lines.append(f"| {model} | {m} | {part} | {name} | {us:.1f} | {tf:.0f} ({tf / peak:.1%}) | {diff} |")
        print(lines[-1], flush=True)

    def measure(part: str, name: str, call) -> tuple[float, torch.Tensor] | None:  # type: ignore[no-untyped-def]
        """(µs over both routings, routing 0's output) of call(i), or None with the failure reported."""
        try:
            return gt.time_graph([lambda i=i: call(i) for i in range(2)]), call(0).clone()
        except Exception as exc:  # noqa: BLE001 - a candidate that does not compile is reported, not fatal
            lines.append(f"| {model} | {m} | {part} | {name} | failed: {type(exc).__name__} | | |")
            print(lines[-1], flush=True)
            return None

    best: dict = {}
    for bm in sorted({table["BLOCK_M"], 128}):
        p = Point(w13, w2, m, shared, bm)
        t_gather = gt.time_graph([lambda i=i, p=p: p.gather(i) for i in range(2)])
        row("gather x", f"BM{bm}", t_gather, 0, "-")
        ref_up = ref_down = None
        for name, cfg, xb in _up_variants(table["up"]):
            if time.time() > deadline:
                break
            got = measure("gate_up", f"BM{bm} {name}", lambda i, p=p, c=cfg, xb=xb: p.up(i, c, xb, False))
            if got is None:
                continue
            t, out = got
            ref_up = out if ref_up is None else ref_up
            total = t + (t_gather if xb else 0.0)
            row("gate_up", f"BM{bm} {name}" + (" + gather" if xb else ""), total, flops_up,
                f"{(out.float() - ref_up.float()).abs().max().item():.3g}")
            if total < best.get("up", (float("inf"),))[0]:
                best["up"] = (total, bm, cfg)
        for name, cfg in _down_variants(table["down"]):
            if time.time() > deadline:
                break
            got = measure("down", f"BM{bm} {name}", lambda i, p=p, c=cfg: p.down(i, c))
            if got is None:
                continue
            t, out = got
            ref_down = out if ref_down is None else ref_down
            row("down", f"BM{bm} {name}", t, flops_down, f"{(out.float() - ref_down.float()).abs().max().item():.3g}")
            key = ("down", bm)
            if t < best.get(key, (float("inf"),))[0]:
                best[key] = (t, bm, cfg)
        p = None  # free its buffers before the next BLOCK_M
        torch.cuda.empty_cache()
    if "up" not in best or ("down", best["up"][1]) not in best:
        return lines, None
    bm = best["up"][1]
    chosen = {"BLOCK_M": bm, "up": best["up"][2], "down": best[("down", bm)][2]}
    # whole op, shipped table vs the best pair (same BLOCK_M), interleaved
    xs = [torch.randn(m, h, device="cuda", dtype=BF) for _ in range(2)]
    routes = [tm.grouped_topk(torch.randn(m, e_all - shared, device="cuda"), torch.zeros(e_all - shared, device="cuda"),
                              TOP_K, 1, 1, True, 1.0, shared) for _ in range(2)]
    times: dict[str, list[float]] = {"table": [], "best": []}
    for _ in range(2):
        for name, cfg in (("table", table), ("best", chosen)):
            times[name].append(gt.time_graph([lambda i=i, c=cfg: tm.fused_moe_with_config(xs[i], w13, w2, *routes[i], c)
                                              for i in range(2)]))
    a = tm.fused_moe_with_config(xs[0], w13, w2, *routes[0], table)
    b = tm.fused_moe_with_config(xs[0], w13, w2, *routes[0], chosen)
    diff = f"{(a.float() - b.float()).abs().max().item():.3g}"
    for name in ("table", "best"):
        row("whole fused_moe", name, min(times[name]), flops_up + flops_down, diff if name == "best" else "-")
    return lines, chosen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="4096,2048")
    ap.add_argument("--models", default="glm45+shared,air+shared,glm45,air")
    ap.add_argument("--budget-s", type=float, default=400)
    args = ap.parse_args()
    deadline = time.time() + args.budget_s
    info = gt.device_info()
    ceil = gt.measure_ceilings()
    print(f"{info['gpu']}, driver {info['driver']}, torch {info['torch']}, triton {info['triton']}")
    print(f"ceilings: read {ceil['read_gbs']:.0f} GB/s, bf16 GEMM {ceil['gemm_tflops']:.0f} TFLOP/s")
    head = "| shape | M | part | variant | µs | TFLOP/s (of peak) | max abs diff vs first row |"
    lines = [head, "|---|---|---|---|---|---|---|"]
    print(head)
    chosen: dict = {}
    for model in args.models.split(","):
        e, h, inter, shared = MODELS[model]
        w13 = torch.randn(e + shared, 2 * inter, h, device="cuda", dtype=BF) / h**0.5
        w2 = torch.randn(e + shared, h, inter, device="cuda", dtype=BF) / inter**0.5
        for m in (int(v) for v in args.m.split(",")):
            if time.time() > deadline:
                print(f"budget spent before {model} M={m}")
                break
            new, cfg = _bench_point(ceil, model, w13, w2, m, shared, deadline)
            lines += new
            if cfg:
                chosen[f"{model} M={m}"] = cfg
        del w13, w2
        torch.cuda.empty_cache()
    out = gt.out_dir()
    if out:
        (out / "bench_moe_blocked.md").write_text(
            f"{info['gpu']}, driver {info['driver']}; GEMM {ceil['gemm_tflops']:.0f} TFLOP/s\n\n" + "\n".join(lines) + "\n")
        (out / "moe_blocked_best.json").write_text(json.dumps(chosen, indent=1))


if __name__ == "__main__":
    main()
