"""Kernel benchmark: every Triton kernel at serving shapes vs its roofline floor and torch twin.

    python3 -m benchmarks.kernels.bench_kernels [--sections moe,attention,small] [--budget-s 220] [--moe-m 1,8]

Prints GPU, driver and the measured ceilings (device copy counting read+write, pure read, bf16
GEMM 8192^3), then per kernel/shape: median time, roofline floor (bytes over the measured
bandwidth — read bandwidth when the kernel mostly reads, copy bandwidth otherwise — and FLOPs
over the measured GEMM rate), floor/time, the torch reference's time and the speedup over it,
and the relative error vs an fp32 reference on fresh random bf16 data. MoE rows also give the
targets: M<=64 weight bytes / time vs read bandwidth (>= 90%), M>=1024 FLOP rate vs GEMM
peak (>= 65%); decode attention rows KV bytes / time vs read bandwidth. With OUT set, rows are
appended to $OUT/bench_kernels.md and $OUT/bench_kernels.jsonl as they finish.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback

import torch

from benchmarks import measure
from common.attention import torch_ref
from common.attention import triton_paged as tp
from common.forward.batch import ForwardBatch, SeqSpec
from common.ops import reference as ref
from common.ops import triton_kv as tk
from common.ops import triton_moe as tm
from common.ops import triton_norm as tn

BF = torch.bfloat16
DEV = "cuda"
COLS = ("kernel", "shape", "time_us", "floor_us", "frac", "bound", "ref_us", "speedup", "rel_err", "target")


class Report:
    def __init__(self, ceil: dict, budget_s: float) -> None:
        self.ceil, self.rows, self.deadline = ceil, [], time.time() + budget_s
        self.out = measure.out_dir()

    def over_budget(self) -> bool:
        return time.time() > self.deadline

    def add(self, kernel: str, shape: str, t_us: float, bytes_rd: float, bytes_wr: float, flops: float,
            ref_us: float | None, err: float, target: str = "") -> None:
        bw = self.ceil["read_gbs"] if bytes_wr <= 0.1 * (bytes_rd + bytes_wr) else self.ceil["copy_gbs"]
        t_mem = (bytes_rd + bytes_wr) / (bw * 1e3)  # us
        t_cmp = flops / (self.ceil["gemm_tflops"] * 1e6)  # us
        floor = max(t_mem, t_cmp)
        row = {"kernel": kernel, "shape": shape, "time_us": round(t_us, 2), "floor_us": round(floor, 2),
               "frac": round(floor / t_us, 3), "bound": "mem" if t_mem >= t_cmp else "flops",
               "ref_us": round(ref_us, 1) if ref_us else None,
               "speedup": round(ref_us / t_us, 2) if ref_us else None, "rel_err": f"{err:.2e}", "target": target}
        self.rows.append(row)
        print(" | ".join(str(row[c]) for c in COLS), flush=True)
        if self.out:
            md = self.out / "bench_kernels.md"
            if not md.exists():
                md.write_text("| " + " | ".join(COLS) + " |\n|" + "---|" * len(COLS) + "\n")
            with md.open("a") as f:
                f.write("| " + " | ".join(str(row[c]) for c in COLS) + " |\n")
            with (self.out / "bench_kernels.jsonl").open("a") as f:
                f.write(json.dumps(row) + "\n")

    def fail(self, kernel: str, shape: str, exc: BaseException) -> None:
        print(f"{kernel} | {shape} | ERROR {type(exc).__name__}: {exc}", flush=True)
        traceback.print_exc()
        if self.out:
            with (self.out / "bench_kernels.md").open("a") as f:
                f.write(f"| {kernel} | {shape} | ERROR {type(exc).__name__}: {str(exc)[:200]} |\n")


# ------------------------------------------------------------------------------------ MoE
# E routed, H, I_e, shared experts fused in as extra columns (the model's configuration: moe.py)
MOE_MODELS = {"air": (128, 4096, 1408, 0), "glm45": (160, 5120, 1536, 0), "air+shared": (128, 4096, 1408, 1),
              "glm45+shared": (160, 5120, 1536, 1)}
MOE_M = [1, 8, 32, 64, 1024, 4096]


def bench_moe(rep: Report) -> None:
    for model, (e, h, inter, shared) in MOE_MODELS.items():
        if rep.over_budget():
            return
        _moe_model(rep, model, e, h, inter, shared)
        torch.cuda.empty_cache()


def _moe_model(rep: Report, model: str, e: int, h: int, inter: int, shared: int) -> None:
    w13 = torch.randn(e + shared, 2 * inter, h, device=DEV, dtype=BF) / h**0.5
    w2 = torch.randn(e + shared, h, inter, device=DEV, dtype=BF) / inter**0.5
    for m in MOE_M:
        if rep.over_budget():
            return
        shape = f"{model} E={e}{f'+{shared}' if shared else ''} H={h} I={inter} k=8{f'+{shared}' if shared else ''} M={m}"
        try:
            _moe_point(rep, shape, w13, w2, m, shared)
        except Exception as exc:  # noqa: BLE001 - keep measuring the rest
            rep.fail("fused_moe", shape, exc)


def _moe_point(rep: Report, shape: str, w13: torch.Tensor, w2: torch.Tensor, m: int, shared: int) -> None:
    e, n2, h = w13.shape
    e -= shared
    inter = n2 // 2
    xs = [torch.randn(m, h, device=DEV, dtype=BF) for _ in range(2)]
    routes = [tm.grouped_topk(torch.randn(m, e, device=DEV), torch.zeros(e, device=DEV), 8, 1, 1, True, 1.0, shared)
              for _ in range(2)]
    t = measure.time_graph([lambda i=i: tm.fused_moe(xs[i], w13, w2, *routes[i]) for i in range(2)])
    x, (weights, ids) = xs[0], routes[0]
    used, remap = torch.unique(ids.long(), return_inverse=True)  # fp32 copies of the touched experts only
    want = ref.fused_moe(x.float(), w13[used].float(), w2[used].float(), weights, remap.int())
    err = measure.rel_err(tm.fused_moe(x, w13, w2, weights, ids), want)
    del want
    torch.cuda.empty_cache()
    w_bytes = used.numel() * 3 * inter * h * 2
    flops = 2 * m * (8 + shared) * 3 * inter * h
    ref_t = measure.time_eager(lambda: ref.fused_moe(x, w13, w2, weights, ids), rep_ms=60)
    target = ""
    if m <= 64:
        frac = w_bytes / (t * 1e3) / rep.ceil["read_gbs"]
        target = f"weights {w_bytes / 1e6:.0f} MB: {frac:.0%} of read bw (>=90%)"
    elif m >= 1024:
        frac = flops / (t * 1e6) / rep.ceil["gemm_tflops"]
        floor_us = max(w_bytes / (rep.ceil["read_gbs"] * 1e3), flops / (rep.ceil["gemm_tflops"] * 1e6))
        cap = flops / (floor_us * 1e6) / rep.ceil["gemm_tflops"]  # the weight stream bounds the rate
        target = f"{flops / t / 1e6:.0f} TFLOP/s: {frac:.0%} of GEMM peak (>=65%; roofline caps it at {cap:.0%})"
    rep.add("fused_moe", shape, t, w_bytes + 2 * m * h * 2, 0, flops, ref_t, err, target)


# ------------------------------------------------------------------------------ attention
def _attn_sets(specs, sets, hk=8, hq=96, d=128, page=16):  # type: ignore[no-untyped-def]
    per = sum(-(-s // page) for _, s, _, _ in specs)
    kc = torch.randn(per * sets + 1, page, hk, d, device=DEV, dtype=BF)
    vc = torch.randn(per * sets + 1, page, hk, d, device=DEV, dtype=BF)
    perm = (torch.randperm(per * sets) + 1).tolist()
    out, used = [], 0
    for _ in range(sets):
        seqs = []
        for q, seq_len, prefix, masked in specs:
            n_pages = -(-seq_len // page)
            prefix = seq_len - q if prefix is None else prefix
            mask = None
            if masked:
                mask = torch.rand(q, seq_len - prefix) < 0.5
                mask[torch.arange(q), seq_len - prefix - q + torch.arange(q)] = True
            seqs.append(SeqSpec([1] * q, list(range(q)), seq_len, perm[used : used + n_pages], prefix, mask))
            used += n_pages
        batch = ForwardBatch.build(seqs, page, DEV)
        out.append((torch.randn(batch.num_tokens, hq, d, device=DEV, dtype=BF), batch))
    return kc, vc, out


ATTN = {
    "decode b1 @1K": [(1, 1024, None, False)],
    "decode b1 @8K": [(1, 8192, None, False)],
    "decode b32 @1K": [(1, 1024, None, False)] * 32,
    "decode b32 @8K": [(1, 8192, None, False)] * 32,
    "extend 1x2048": [(2048, 2048, 0, False)],
    "extend 1x2048 after 4K prefix": [(2048, 6144, None, False)],
    "verify b8 q4 mask @2K": [(4, 2048, 2044, True)] * 8,
}


ATTN_DIMS = {"hq": 96, "hk": 8, "d": 128, "page": 16}


def bench_attention(rep: Report) -> None:
    for name, specs in ATTN.items():
        if rep.over_budget():
            return
        try:
            _attn_case(rep, name, specs)
        except Exception as exc:  # noqa: BLE001
            rep.fail("paged_attention", name, exc)
        torch.cuda.empty_cache()


def _attn_case(rep: Report, name: str, specs: list) -> None:
    hq, hk, d, page = (ATTN_DIMS[k] for k in ("hq", "hk", "d", "page"))
    kv_bytes = sum(s for _, s, _, _ in specs) * hk * d * 2 * 2
    n_q = sum(q for q, _, _, _ in specs)
    kc, vc, inputs = _attn_sets(specs, measure.rotations(kv_bytes), hk, hq, d, page)
    t = measure.time_graph([lambda q=q, b=b: tp.paged_attention(q, kc, vc, b, d**-0.5) for q, b in inputs])
    q, batch = inputs[0]
    want = torch_ref.paged_attention(q, kc, vc, batch, d**-0.5)
    err = measure.rel_err(tp.paged_attention(q, kc, vc, batch, d**-0.5), want)
    ref_t = measure.time_eager(lambda: torch_ref.paged_attention(q, kc, vc, batch, d**-0.5), rep_ms=60)
    pairs = 0
    for qn, s, p, masked in specs:
        p = s - qn if p is None else p
        pairs += qn * p + (qn * (s - p) // 2 if masked else qn * (s - p) - qn * (qn - 1) // 2)
    target = ""
    if name.startswith("decode"):
        frac = kv_bytes / (t * 1e3) / rep.ceil["read_gbs"]
        goal = "40%" if "b1 " in name else "80%"
        target = f"KV {kv_bytes / 1e6:.0f} MB: {frac:.0%} of read bw (>={goal})"
    rep.add("paged_attention", f"{name} (Hq{hq} Hk{hk} D{d}, page {page})", t, kv_bytes + n_q * hq * d * 2,
            n_q * hq * d * 2, 4 * pairs * hq * d, ref_t, err, target)


# ------------------------------------------------------------------------------ small ops
SMALL_DIMS = {"h": 5120, "hq": 96, "hk": 8, "d": 128, "rot": 64, "e": 160, "max_pos": 131072, "pages": 8192,
              "norm_t": (1, 64, 4096), "rope_t": (1, 64, 2048), "topk_t": (1, 64, 4096)}


def bench_small(rep: Report) -> None:
    h, hq, hk, d, rot, e, max_pos, pages = (SMALL_DIMS[k] for k in ("h", "hq", "hk", "d", "rot", "e", "max_pos", "pages"))
    inv = 1.0 / (1e6 ** (torch.arange(0, rot, 2).float() / rot))
    ang = torch.arange(max_pos).float()[:, None] * inv[None]
    cos_sin = torch.cat((ang.cos(), ang.sin()), -1).to(DEV)
    w = (1 + 0.1 * torch.randn(h, device=DEV)).to(BF)
    nw = (1 + 0.1 * torch.randn(d, device=DEV)).to(BF)
    pool_k = torch.randn(pages, 16, hk, d, device=DEV, dtype=BF)
    pool_v = torch.randn_like(pool_k)

    def case(kernel, shape, make, run, run_ref, check, rd, wr):  # type: ignore[no-untyped-def]
        """make() -> args; run/run_ref(*args) are timed; check(*args) -> [(got, want fp32), ...]."""
        if rep.over_budget():
            return
        try:
            sets = [make() for _ in range(measure.rotations(rd + wr))]
            t = measure.time_graph([lambda a=a: run(*a) for a in sets])
            ref_t = measure.time_graph([lambda a=a: run_ref(*a) for a in sets])
            err = max(measure.rel_err(g, r) for g, r in check(*sets[0]))
            rep.add(kernel, shape, t, rd, wr, 0.0, ref_t, err)
        except Exception as exc:  # noqa: BLE001
            rep.fail(kernel, shape, exc)

    def rows(n):  # type: ignore[no-untyped-def]
        return lambda: (torch.randn(n, h, device=DEV, dtype=BF), torch.randn(n, h, device=DEV, dtype=BF))

    for n in SMALL_DIMS["norm_t"]:
        case("rms_norm", f"T={n} H={h}", rows(n), lambda x, r: tn.rms_norm(x, w, 1e-5),
             lambda x, r: ref.rms_norm(x, w, 1e-5),
             lambda x, r: [(tn.rms_norm(x, w, 1e-5), ref.rms_norm(x.float(), w.float(), 1e-5))],
             n * h * 2, n * h * 2)
        case("fused_add_rms_norm", f"T={n} H={h}", rows(n), lambda x, r: tn.fused_add_rms_norm(x, r, w, 1e-5),
             lambda x, r: ref.fused_add_rms_norm(x, r, w, 1e-5),
             lambda x, r: list(zip(tn.fused_add_rms_norm(x, r, w, 1e-5), ref.fused_add_rms_norm(x, r, w, 1e-5))),
             2 * n * h * 2, 2 * n * h * 2)

    def qk(n):  # type: ignore[no-untyped-def]
        def make():  # type: ignore[no-untyped-def]
            qkv = torch.randn(n, (hq + 2 * hk) * d, device=DEV, dtype=BF)
            return (qkv[:, : hq * d].view(n, hq, d), qkv[:, hq * d : (hq + hk) * d].view(n, hk, d),
                    torch.randint(0, max_pos, (n,), device=DEV))
        return make

    for n in SMALL_DIMS["rope_t"]:
        nbytes = n * (hq + hk) * d * 2
        case("qk_norm_rope", f"T={n} Hq={hq} Hk={hk} D={d} rot={rot}", qk(n),
             lambda q, k, p: tn.qk_norm_rope(q, k, p, cos_sin, rot, nw, nw, 1e-5),
             lambda q, k, p: ref.qk_norm_rope(q, k, p, cos_sin, rot, nw, nw, 1e-5),
             lambda q, k, p: list(zip(tn.qk_norm_rope(q, k, p, cos_sin, rot, nw, nw, 1e-5),
                                      ref.qk_norm_rope(q.float(), k.float(), p, cos_sin, rot, nw.float(),
                                                       nw.float(), 1e-5))),
             nbytes, nbytes)

    def kv(n):  # type: ignore[no-untyped-def]
        def make():  # type: ignore[no-untyped-def]
            both = torch.randn(n, 2, hk, d, device=DEV, dtype=BF)
            return both[:, 0], both[:, 1], torch.randperm(pages * 16, device=DEV)[:n]
        return make

    def kv_check(k, v, s):  # type: ignore[no-untyped-def]
        pool_k.view(-1, hk, d)[s] = float("nan")
        tk.store_kv(pool_k, pool_v, k, v, s)
        return [(pool_k.view(-1, hk, d)[s], k), (pool_v.view(-1, hk, d)[s], v)]

    for n in SMALL_DIMS["rope_t"]:
        nbytes = 2 * n * hk * d * 2
        case("store_kv", f"T={n} Hk={hk} D={d} page 16", kv(n), lambda k, v, s: tk.store_kv(pool_k, pool_v, k, v, s),
             lambda k, v, s: ref.store_kv(pool_k, pool_v, k, v, s), kv_check, nbytes, nbytes)

    def topk_check(lg, b):  # type: ignore[no-untyped-def]
        out = []
        for fn in (tm.grouped_topk, ref.grouped_topk):
            wts, ids = fn(lg, b, 8, 1, 1, True, 2.5)
            order = ids.argsort(1)
            out.append((wts.gather(1, order), ids.gather(1, order).float()))
        return list(zip(out[0], out[1]))

    for n in SMALL_DIMS["topk_t"]:
        case("grouped_topk", f"T={n} E={e} k=8",
             lambda n=n: (torch.randn(n, e, device=DEV), 0.1 * torch.randn(e, device=DEV)),
             lambda lg, b: tm.grouped_topk(lg, b, 8, 1, 1, True, 2.5),
             lambda lg, b: ref.grouped_topk(lg, b, 8, 1, 1, True, 2.5), topk_check, n * e * 4, n * 8 * 8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default="moe,attention,small")
    ap.add_argument("--budget-s", type=float, default=220.0, help="stop starting new rows after this")
    ap.add_argument("--moe-m", default=",".join(map(str, MOE_M)), help="token counts of the MoE rows")
    args = ap.parse_args()
    MOE_M[:] = [int(v) for v in args.moe_m.split(",")]
    info = measure.device_info()
    out = measure.out_dir()
    ceil = measure.measure_ceilings(out / "ceilings.json" if out else None)
    print(f"GPU {info['gpu']} | driver {info['driver']} | SMs {info['sms']} | torch {info['torch']} | "
          f"triton {info['triton']} | CUDA {info['cuda']}")
    print(f"ceilings: device copy {ceil['copy_gbs']:.0f} GB/s (read+write), read {ceil['read_gbs']:.0f} GB/s, "
          f"bf16 GEMM 8192^3 {ceil['gemm_tflops']:.0f} TFLOP/s")
    print(" | ".join(COLS))
    if out and not (out / "bench_kernels_header.txt").exists():
        (out / "bench_kernels_header.txt").write_text(json.dumps({**info, **ceil}, indent=1))
    rep = Report(ceil, args.budget_s)
    sections = {"moe": bench_moe, "attention": bench_attention, "small": bench_small}
    for name in args.sections.split(","):
        sections[name](rep)
    if rep.over_budget():
        print(f"budget of {args.budget_s:.0f} s reached: later rows skipped")


if __name__ == "__main__":
    main()
