"""FP8 linear benchmark: the FP8 GEMMs against bf16 at the projection shapes of GLM-4.5 and
GLM-4.5-Air (full width and their tensor-parallel slices at TP 2/4/8), and the fused FP8 producers against
their unfused pairs.

    python3 -m benchmarks.kernels.bench_fp8_linear [--out FILE.json] [--models glm45,air] [--tp 1,2,4,8]
        [--m 1,8,32,64,256,1024,2048,4096] [--fused-t 1,64,4096] [--sections linear,fused,sweep,accum,quant-in-gemm]
        [--budget-s 450]

Prints GPU, driver and the measured ceilings (device copy, pure read, bf16 GEMM 8192^3, FP8 GEMM
8192^3 with fp32 and with fast accumulation: the faster is the FP8 peak),
then per projection shape and token count M the median time (CUDA-graph replays, inputs and weights
rotated past L2) of:
  bf16      F.linear of bf16 x and W (cuBLAS), what the bf16 model runs;
  ch        cuBLAS row-wise on pre-quantised x (cublas_fp8.scaled_mm_linear; `ref` marks the reference
            fallback where cuBLAS cannot take the shape), ch+q the same with the per-token quant of x;
  chT       the Triton channel-scaled GEMM (triton_fp8_gemm.fp8_linear, split-K at M <= 64);
  op        ops.fp8_linear, what the model calls (Triton at M <= cublas_fp8.SMALL_M and where cuBLAS
            cannot run the shape, else cuBLAS);
  blk       ops.fp8_block_linear on pre-quantised x (the Triton block GEMM), blk+q with the
            per-128-group quant of x. Shapes whose K is not a multiple of 128 have no block path.
For each: weight GB/s and its fraction of the read bandwidth, TFLOP/s and its fraction of the bf16 or
FP8 peak, speedup over bf16, and the relative error against the twin at M = 64. The targets:
the faster channel FP8 GEMM (quantised activations in hand, as the fused producers leave them) at
>= 1.7x bf16 for M <= 64 and >= 1.5x for M >= 2048, PASS/FAIL per point and in the summary.

Sweep section (--sections sweep), M <= 64: the Triton channel GEMM over a grid of tiles at each
projection shape, in two passes: BLOCK_N 32 / 64 / 128 x split-K 1-8 x the tile plain or swapped (W x^T,
for BLOCK_N >= 64 and up to 32 token rows; its weight tiles by loads or by TMA) at 4 stages, then the
three fastest of those at 3 and 6 stages; the best configuration against `default_config`'s choice
and cuBLAS, so the few-token heuristic is checked shape by shape.

Quantised-in-GEMM section (--sections quant-in-gemm; --m up to 64): o_proj's unquantised input through
the per-token quantiser's launch and the few-token GEMM, against the GEMM quantising it as it loads
it (from handed-over per-head amaxes, or re-reading the row), with bit-equality checked.

Accumulation section (--sections accum; --m as given, e.g. 256,2048,8192): cuBLAS row-wise at each
full-width projection shape with fp32 accumulation and with fast accumulation (`cublas_fp8.FAST_ACCUM_ROWS`),
each timed and its relative error against the fp32 twin on the same FP8 operands.

Fused section, at T tokens: rms_norm + quant_fp8_per_token (or per 128 group) against
rms_norm_quant_fp8, fused_add_rms_norm + quant against fused_add_rms_norm_quant_fp8, silu_and_mul +
quant against silu_and_mul_quant_fp8, and the per-token quantiser alone, each with its bytes floor
over the copy bandwidth. Everything goes to FILE.json (--out) and, with OUT set, to
$OUT/bench_fp8_linear.json and the tables to $OUT/bench_fp8_linear.md, rewritten as rows finish.
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks import measure
from common import ops
from common.ops import cublas_fp8
from common.ops import reference as ref
from common.ops import triton_fp8 as tf
from common.ops import triton_fp8_gemm as tg
from common.ops import triton_norm as tn

BF = torch.bfloat16
DEV = "cuda"
BLOCK = 128
# hidden, fused q|k|v rows, o_proj input (q heads x head_dim), dense MLP intermediate; a TP-t rank holds
# 1/t of the qkv and gate_up rows (column-parallel) and of the o and down inputs (row-parallel)
MODELS = {"glm45": (5120, 14336, 12288, 12288), "air": (4096, 14336, 12288, 10944)}
M_ALL = [1, 8, 32, 64, 256, 1024, 2048, 4096]
TARGETS = ((64, 1.7), (2048, 1.5))  # M <= 64: >= 1.7x bf16; M >= 2048: >= 1.5x


def projection_shapes(models: list[str], tps: list[int]) -> Iterator[tuple[str, str, int, int, int]]:
    """(model, projection, tp, N, K) of each dense projection on one rank, full width first."""
    for tp in tps:
        for model in models:
            h, qkv, o_in, inter = MODELS[model]
            yield model, "qkv", tp, qkv // tp, h
            yield model, "o", tp, h, o_in // tp
            yield model, "gate_up", tp, 2 * inter // tp, h
            yield model, "down", tp, h, inter // tp


def target_for(m: int) -> float | None:
    if m <= TARGETS[0][0]:
        return TARGETS[0][1]
    return TARGETS[1][1] if m >= TARGETS[1][0] else None


class Report:
    """Rows as they finish; the JSON (--out, and $OUT/bench_fp8_linear.json) is rewritten after each,
    so a run cut short by its stage limit keeps what it measured."""

    def __init__(self, info: dict, ceil: dict, budget_s: float, out_json: Path | None) -> None:
        self.info, self.ceil, self.deadline, self.out_json = info, ceil, time.time() + budget_s, out_json
        self.linear: list[dict] = []
        self.fused: list[dict] = []
        self.sweep: list[dict] = []
        self.accum: list[dict] = []
        self.quant_in_gemm: list[dict] = []
        self.errors: list[str] = []

    def over_budget(self) -> bool:
        return time.time() > self.deadline

    def result(self) -> dict:
        return {"device": self.info, "ceilings": self.ceil, "summary": summary(self.linear), "linear": self.linear,
                "fused": self.fused, "sweep": self.sweep, "accum": self.accum,
                "quant_in_gemm": self.quant_in_gemm, "errors": self.errors}

    def save(self) -> None:
        text = json.dumps(self.result(), indent=1) + "\n"
        if self.out_json is not None:
            self.out_json.write_text(text)
        measure.write_out("bench_fp8_linear.json", text)

    def emit(self, table: str, header: str, line: str) -> None:
        print(line, flush=True)
        out = measure.out_dir()
        if out is None:
            self.save()
            return
        md = out / "bench_fp8_linear.md"
        text = md.read_text() if md.exists() else ""
        if f"## {table}\n" not in text:
            text += f"\n## {table}\n\n{header}\n"
        md.write_text(text + line + "\n")
        self.save()

    def fail(self, what: str, exc: BaseException) -> None:
        msg = f"{what}: ERROR {type(exc).__name__}: {str(exc)[:300]}"
        self.errors.append(msg)
        print(msg, flush=True)
        traceback.print_exc()


# ------------------------------------------------------------------------------------ linear
LINEAR_HEADER = ("| shape | M | bf16 us | ch us (x) | ch+q us (x) | chT us (x) | op us (x) | blk us (x) | blk+q us (x) | "
                 "best ch GB/s (%rd) | best ch TFLOP/s (%fp8) | bf16 TFLOP/s (%bf16) | "
                 "rel err ch/chT/blk | target |\n|" + "---|" * 14)


class Weights:
    """`sets` rotated copies of one projection's weight: bf16, channel FP8, block FP8 (K % 128 == 0)."""

    def __init__(self, n: int, k: int, sets: int) -> None:
        self.n, self.k, self.sets = n, k, sets
        self.bf16 = [(torch.randn(n, k, device=DEV) * k**-0.5).to(BF) for _ in range(sets)]
        self.channel = [ops.quant_fp8_per_token(w) for w in self.bf16]
        self.block = [ref.quant_fp8_weight_blocks(w, BLOCK) for w in self.bf16] if k % BLOCK == 0 else None


def bench_linear(rep: Report, models: list[str], tps: list[int], ms: list[int]) -> None:
    for model, proj, tp, n, k in projection_shapes(models, tps):
        if rep.over_budget():
            rep.errors.append(f"budget spent before {model} {proj} tp={tp}")
            return
        shape = f"{model} {proj} tp={tp} N={n} K={k}"
        try:
            per_call = n * k * 3 + max(ms) * k * 2  # fp8 + bf16 weights, one x
            weights = Weights(n, k, measure.rotations(per_call))
            for m in ms:
                if rep.over_budget():
                    return
                _linear_point(rep, model, proj, tp, shape, weights, m)
            del weights
        except Exception as exc:  # noqa: BLE001 - keep measuring the rest
            rep.fail(shape, exc)
        torch.cuda.empty_cache()


def _linear_point(rep: Report, model: str, proj: str, tp: int, shape: str, wts: Weights, m: int) -> None:
    n, k, sets = wts.n, wts.k, wts.sets
    xs = [torch.randn(m, k, device=DEV).to(BF) for _ in range(sets)]
    xq = [ops.quant_fp8_per_token(x) for x in xs]
    t: dict[str, float | None] = dict.fromkeys(("bf16", "ch", "ch+q", "chT", "op", "blk", "blk+q"))

    def timed(key: str, call: Callable[[int], object]) -> None:
        try:
            t[key] = measure.time_graph([lambda i=i: call(i) for i in range(sets)])
        except Exception as exc:  # noqa: BLE001 - one path failing leaves the others measured
            rep.fail(f"{shape} M={m} {key}", exc)

    timed("bf16", lambda i: F.linear(xs[i], wts.bf16[i]))
    timed("ch", lambda i: cublas_fp8.scaled_mm_linear(*xq[i], *wts.channel[i]))
    timed("ch+q", lambda i: cublas_fp8.scaled_mm_linear(*ops.quant_fp8_per_token(xs[i]), *wts.channel[i]))
    timed("chT", lambda i: tg.fp8_linear(*xq[i], *wts.channel[i]))
    timed("op", lambda i: ops.fp8_linear(*xq[i], *wts.channel[i]))
    ch_fits = cublas_fp8.scaled_mm_fits(*xq[0], *wts.channel[0], None, BF)
    if wts.block is not None:
        xg = [ops.quant_fp8_per_group(x, BLOCK) for x in xs]
        blocks = wts.block
        timed("blk", lambda i: ops.fp8_block_linear(*xg[i], *blocks[i], None, BF, BLOCK))
        timed("blk+q", lambda i: ops.fp8_block_linear(*ops.quant_fp8_per_group(xs[i], BLOCK), *blocks[i], None, BF,
                                                      BLOCK))
    if t["bf16"] is None or t["ch"] is None and t["chT"] is None:
        return  # nothing to compare (the failure is reported)
    errs = _errors(rep, shape, xs[0], wts) if m == 64 else {}
    _linear_row(rep, model, proj, tp, shape, n, k, m, t, ch_fits, errs)


def _errors(rep: Report, shape: str, x: torch.Tensor, wts: Weights) -> dict[str, float]:
    """Relative error of each FP8 path against its twin on the same FP8 operands."""
    errs: dict[str, float] = {}
    try:
        x_q, x_s = ops.quant_fp8_per_token(x)
        want = ref.fp8_linear(x_q, x_s, *wts.channel[0], None, torch.float32)
        errs["ch"] = measure.rel_err(cublas_fp8.scaled_mm_linear(x_q, x_s, *wts.channel[0]), want)
        errs["chT"] = measure.rel_err(tg.fp8_linear(x_q, x_s, *wts.channel[0]), want)
        if wts.block is not None:
            g_q, g_s = ops.quant_fp8_per_group(x, BLOCK)
            want = ref.fp8_block_linear(g_q, g_s, *wts.block[0], None, torch.float32, BLOCK)
            errs["blk"] = measure.rel_err(ops.fp8_block_linear(g_q, g_s, *wts.block[0], None, BF, BLOCK), want)
    except Exception as exc:  # noqa: BLE001 - the timings stand without the error check
        rep.fail(f"{shape} errors", exc)
    return errs


def _linear_row(rep: Report, model: str, proj: str, tp: int, shape: str, n: int, k: int, m: int,
                t: dict[str, float | None], ch_fits: bool, errs: dict[str, float]) -> None:
    ceil = rep.ceil
    flops = 2.0 * m * n * k
    t_bf = t["bf16"]
    # judged on what the model runs (ops.fp8_linear); the faster of the two GEMMs where it failed
    best_key = "op" if t["op"] else min(("ch", "chT"), key=lambda key: t[key] or float("inf"))
    best = t[best_key]
    assert t_bf is not None and best is not None  # checked by the caller
    speedup = t_bf / best
    target = target_for(m)
    verdict = "" if target is None else f"{'PASS' if speedup >= target else 'FAIL'} {speedup:.2f}x vs >= {target}x"
    fp8_bytes = n * k + 4 * n  # weight codes and channel scales
    row = {
        "model": model, "proj": proj, "tp": tp, "n": n, "k": k, "m": m,
        "us": {key: (round(v, 2) if v is not None else None) for key, v in t.items()},
        "speedup": {key: (round(t_bf / v, 3) if v else None) for key, v in t.items() if key != "bf16"},
        "ch_path": "cublas" if ch_fits else "reference",
        "best_ch": best_key, "best_ch_gbs": fp8_bytes / best / 1e3, "bf16_gbs": 2 * n * k / t_bf / 1e3,
        "best_ch_tflops": flops / best / 1e6, "bf16_tflops": flops / t_bf / 1e6,
        "rel_err": {key: float(f"{v:.3e}") for key, v in errs.items()}, "target": target, "pass": None,
    }
    if target is not None:
        row["pass"] = speedup >= target
    rep.linear.append(row)

    def cell(key: str) -> str:
        v = t[key]
        if v is None:
            return "-"
        mark = " ref" if key.startswith("ch") and key != "chT" and not ch_fits else ""
        return f"{v:.1f}{mark} ({t_bf / v:.2f})"

    fp8_peak = max(ceil["fp8_tflops"], ceil["fp8_fast_tflops"])
    err = "/".join(f"{errs[key]:.1e}" if key in errs else "-" for key in ("ch", "chT", "blk")) if errs else ""
    rep.emit("FP8 linear", LINEAR_HEADER, (
        f"| {shape} | {m} | {t_bf:.1f} | {cell('ch')} | {cell('ch+q')} | {cell('chT')} | {cell('op')} | {cell('blk')} | "
        f"{cell('blk+q')} | {row['best_ch_gbs']:.0f} ({row['best_ch_gbs'] / ceil['read_gbs']:.0%}) | "
        f"{row['best_ch_tflops']:.0f} ({row['best_ch_tflops'] / fp8_peak:.0%}) | "
        f"{row['bf16_tflops']:.0f} ({row['bf16_tflops'] / ceil['gemm_tflops']:.0%}) | {err} | {verdict} |"))


# ------------------------------------------------------------------------------------ accumulation
ACCUM_HEADER = ("| shape | M | fp32 acc. us (TFLOP/s, %fp8) | fast acc. us (TFLOP/s, %fp8) | fp32 / fast | "
                "rel err fp32 acc. | rel err fast acc. |\n|" + "---|" * 7)


def bench_accum(rep: Report, models: list[str], ms: list[int]) -> None:
    for model, proj, _, n, k in projection_shapes(models, [1]):
        shape = f"{model} {proj} N={n} K={k}"
        try:
            wts = Weights(n, k, measure.rotations(n * k * 3 + max(ms) * k * 2))
            for m in ms:
                if rep.over_budget():
                    rep.errors.append(f"budget spent before {shape} M={m} (accum)")
                    return
                _accum_point(rep, model, proj, shape, wts, m)
            del wts
        except Exception as exc:  # noqa: BLE001 - keep measuring the rest
            rep.fail(f"{shape} (accum)", exc)
        torch.cuda.empty_cache()


def _accum_point(rep: Report, model: str, proj: str, shape: str, wts: Weights, m: int) -> None:
    """cuBLAS (`scaled_mm_linear`, as the model calls it) with fast accumulation off and on (FAST_ACCUM_ROWS)."""
    n, k = wts.n, wts.k
    xq = [ops.quant_fp8_per_token(torch.randn(m, k, device=DEV).to(BF)) for _ in range(wts.sets)]
    want = ref.fp8_linear(*xq[0], *wts.channel[0], None, torch.float32)
    us, err = {}, {}
    served = cublas_fp8.FAST_ACCUM_ROWS
    try:
        for fast in (False, True):
            cublas_fp8.FAST_ACCUM_ROWS = 0 if fast else 1 << 62  # read at each call, also while captured
            us[fast] = measure.time_graph([lambda i=i: cublas_fp8.scaled_mm_linear(*xq[i], *wts.channel[i])
                                           for i in range(wts.sets)])
            err[fast] = measure.rel_err(cublas_fp8.scaled_mm_linear(*xq[0], *wts.channel[0]), want)
    finally:
        cublas_fp8.FAST_ACCUM_ROWS = served
    fp8_peak = max(rep.ceil["fp8_tflops"], rep.ceil["fp8_fast_tflops"])
    tflops = {f: 2.0 * m * n * k / us[f] / 1e6 for f in us}
    rep.accum.append({"model": model, "proj": proj, "n": n, "k": k, "m": m, "us": {"fp32": us[False], "fast": us[True]},
                      "rel_err": {"fp32": err[False], "fast": err[True]}})
    rep.emit("cuBLAS accumulation", ACCUM_HEADER, (
        f"| {shape} | {m} | {us[False]:.1f} ({tflops[False]:.0f}, {tflops[False] / fp8_peak:.0%}) | "
        f"{us[True]:.1f} ({tflops[True]:.0f}, {tflops[True] / fp8_peak:.0%}) | {us[False] / us[True]:.3f} | "
        f"{err[False]:.2e} | {err[True]:.2e} |"))


# ------------------------------------------------------------------------------------ few-token sweep
SWEEP_HEADER = ("| shape | M | cuBLAS us | default cfg | default us | best cfg | best us | best / default |\n|"
                + "---|" * 8)


SWEEP_STAGES = 4  # the first pass's pipeline depth
SWEEP_REFINE = (3, (3, 6))  # the first pass's fastest three, again at these depths


def _sweep_configs(m: int, k: int) -> Iterator[tg.GemmConfig]:
    """The first pass: every tile shape and K split at SWEEP_STAGES (a shape's compiles dominate the
    sweep's time; the depth is refined for the leaders only)."""
    bm = 16 if m <= 16 else 32 if m <= 32 else 64
    for bn in (32, 64, 128):
        for split in (1, 2, 4, 8):
            if split > 1 and k // split < 4 * BLOCK:
                continue
            yield tg.GemmConfig(bm, bn, BLOCK, 1, 4, SWEEP_STAGES, split)
            # swapped (BLOCK_N is the MMA's 64-row side; 64 token rows already are), weights by loads or by TMA
            if bn >= 64 and bm < 64:
                yield tg.GemmConfig(bm, bn, BLOCK, 1, 4, SWEEP_STAGES, split, True)
                yield tg.GemmConfig(bm, bn, BLOCK, 1, 4, SWEEP_STAGES, split, True, True)


def _refined(timed: list[tuple[float, tg.GemmConfig]]) -> Iterator[tg.GemmConfig]:
    """The second pass: the first pass's fastest SWEEP_REFINE[0] configurations at the other depths."""
    count, depths = SWEEP_REFINE
    for _, cfg in sorted(timed, key=lambda p: p[0])[:count]:
        for stages in depths:
            yield cfg._replace(num_stages=stages)


def bench_sweep(rep: Report, models: list[str], tps: list[int], ms: list[int]) -> None:
    for model, proj, tp, n, k in projection_shapes(models, tps):
        if rep.over_budget():
            rep.errors.append(f"sweep: budget spent before {model} {proj} tp={tp}")
            return
        try:
            _sweep_shape(rep, (model, proj, tp), n, k, ms)
        except Exception as exc:  # noqa: BLE001 - keep measuring the rest
            rep.fail(f"sweep {model} {proj} tp={tp}", exc)
        torch.cuda.empty_cache()


def _cfg_name(c: tg.GemmConfig) -> str:
    return f"bn{c.block_n} s{c.split_k} st{c.num_stages}{' swap' if c.swap else ''}{' tma' if c.tma else ''}"


def _sweep_shape(rep: Report, where: tuple[str, str, int], n: int, k: int, ms: list[int]) -> None:
    model, proj, tp = where
    shape = f"{model} {proj} tp={tp} N={n} K={k}"
    sets = measure.rotations(n * k + max(ms) * k)
    ws = [ops.quant_fp8_per_token((torch.randn(n, k, device=DEV) * k**-0.5).to(BF)) for _ in range(sets)]
    for m in ms:
        xq = [ops.quant_fp8_per_token(torch.randn(m, k, device=DEV).to(BF)) for _ in range(sets)]

        def run(cfg: tg.GemmConfig | None, xq: list = xq) -> float:  # type: ignore[type-arg]
            return measure.time_graph([lambda i=i: tg.fp8_gemm(*xq[i], *ws[i], None, BF, 0, cfg) for i in range(sets)])

        default = tg.default_config(m, n, BLOCK, torch.device(DEV), k)
        t_default = run(default)
        t_cublas = measure.time_graph([lambda i=i, xq=xq: cublas_fp8.scaled_mm_linear(*xq[i], *ws[i]) for i in range(sets)])
        timed: list[tuple[float, tg.GemmConfig]] = []
        for first_pass in (True, False):
            for cfg in list(_sweep_configs(m, k) if first_pass else _refined(timed)):
                try:
                    timed.append((run(cfg), cfg))
                except Exception as exc:  # noqa: BLE001 - a config the compiler refuses is skipped
                    rep.errors.append(f"sweep {shape} M={m} {cfg}: {type(exc).__name__}")
        t_best, best = min(timed, key=lambda p: p[0])
        rep.sweep.append({"model": model, "proj": proj, "tp": tp, "n": n, "k": k, "m": m,
                          "cublas_us": round(t_cublas, 2), "default": list(default),
                          "default_us": round(t_default, 2), "best": list(best), "best_us": round(t_best, 2),
                          "all": [[list(c), round(v, 2)] for v, c in timed]})
        rep.emit("Few-token sweep", SWEEP_HEADER, (
            f"| {shape} | {m} | {t_cublas:.1f} | {_cfg_name(default)} | {t_default:.1f} | {_cfg_name(best)} | "
            f"{t_best:.1f} | {t_best / t_default:.2f} |"))


def update_table(path: Path, gpu: str, sweep: list[dict]) -> int:
    """Merge the sweep's fastest tiles into the tuned-tile table `tuned_config` reads: per GPU name,
    per 'N,K', per token bucket ('1': M <= 16, '64': 17-64; the larger M of a bucket decides)."""
    table = json.loads(path.read_text())
    per_gpu = table["tables"].setdefault(gpu, {})
    n = 0
    for row in sorted(sweep, key=lambda r: r["m"]):
        cfg = tg.GemmConfig(*row["best"])
        per_gpu.setdefault(f"{row['n']},{row['k']}", {})["1" if row["m"] <= 16 else "64"] = {
            "block_n": cfg.block_n, "split_k": cfg.split_k, "num_stages": cfg.num_stages,
            "num_warps": cfg.num_warps, "swap": cfg.swap, "tma": cfg.tma, "us": row["best_us"], "cublas_us": row["cublas_us"]}
        n += 1
    path.write_text(json.dumps(table, indent=1) + "\n")
    return n


# ------------------------------------------------------------------------------------ quantised in the GEMM
QIG_HEADER = ("| shape | M | quantiser + GEMM us | in-GEMM, handed amax us (x) | in-GEMM, row re-read us (x) | "
              "bit-equal |\n|" + "---|" * 6)


def bench_quant_in_gemm(rep: Report, models: list[str], ms: list[int]) -> None:
    """o_proj's input (the attention output, bf16) quantised by the per-token quantiser's launch and
    then the few-token GEMM (served), against the GEMM quantising it as it loads it, from per-head
    amaxes handed over by the attention (x_amax) or re-reading the row for its amax."""
    for model in models:
        h, _, o_in, _ = MODELS[model]
        sets = measure.rotations(h * o_in)
        ws = [ops.quant_fp8_per_token((torch.randn(h, o_in, device=DEV) * o_in**-0.5).to(BF)) for _ in range(sets)]
        for m in ms:
            _quant_in_gemm_point(rep, model, ws, m)
        torch.cuda.empty_cache()


def _quant_in_gemm_point(rep: Report, model: str, ws: list, m: int) -> None:  # type: ignore[type-arg]
    sets, (h, o_in) = len(ws), ws[0][0].shape
    xs = [torch.randn(m, o_in, device=DEV).to(BF) for _ in range(sets)]
    amax = [x.float().abs().view(m, o_in // 128, 128).amax(-1) for x in xs]
    served = measure.time_graph([lambda i=i: tg.fp8_gemm(*tf.quant_fp8_per_token(xs[i]), *ws[i], None, BF, 0)
                                 for i in range(sets)])
    handed = measure.time_graph([lambda i=i: tg.fp8_gemm(xs[i], None, *ws[i], None, BF, 0, x_amax=amax[i])
                                 for i in range(sets)])
    reread = measure.time_graph([lambda i=i: tg.fp8_gemm(xs[i], None, *ws[i], None, BF, 0) for i in range(sets)])
    want = tg.fp8_gemm(*tf.quant_fp8_per_token(xs[0]), *ws[0], None, torch.float32, 0)
    same = all(torch.equal(want, got) for got in (
        tg.fp8_gemm(xs[0], None, *ws[0], None, torch.float32, 0, x_amax=amax[0]),
        tg.fp8_gemm(xs[0], None, *ws[0], None, torch.float32, 0)))
    rep.quant_in_gemm.append({"model": model, "n": h, "k": o_in, "m": m, "served_us": round(served, 2),
                              "handed_us": round(handed, 2), "reread_us": round(reread, 2), "bit_equal": same})
    rep.emit("Quantised in the GEMM", QIG_HEADER, (
        f"| {model} o N={h} K={o_in} | {m} | {served:.1f} | {handed:.1f} ({handed / served:.2f}) | "
        f"{reread:.1f} ({reread / served:.2f}) | {same} |"))


# ------------------------------------------------------------------------------------ fused producers
FUSED_HEADER = ("| op | shape | unfused us | fused us | speedup | bytes floor us | fused / floor |\n|"
                + "---|" * 7)


def bench_fused(rep: Report, tokens: list[int]) -> None:
    for t_ in tokens:
        for k in (4096, 12288):  # a hidden row; the attention output of Air and GLM-4.5 (96 heads x 128)
            _rounding_case(rep, t_, k)
        for h in (4096, 5120):
            for group in (0, BLOCK):
                _fused_case(rep, t_, h, group)
        for inter in (10944, 12288, 1536, 1368):
            for group in (0, BLOCK) if inter % BLOCK == 0 else (0,):
                _silu_case(rep, t_, inter, group)
        if rep.over_budget():
            rep.errors.append(f"budget spent in the fused section after T={t_}")
            return


def _quant(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    return tf.quant_fp8_per_token(x) if group == 0 else tf.quant_fp8_per_group(x, group)


def _fused_case(rep: Report, n_tok: int, h: int, group: int) -> None:
    shape = f"T={n_tok} H={h} group={group}"
    try:
        act = n_tok * h * 2
        codes = n_tok * h + n_tok * 4 * (h // group if group else 1)
        sets = measure.rotations(4 * act + codes)
        xs = [torch.randn(n_tok, h, device=DEV).to(BF) for _ in range(sets)]
        rs = [torch.randn(n_tok, h, device=DEV).to(BF) for _ in range(sets)]
        w = (1 + 0.1 * torch.randn(h, device=DEV)).to(BF)
        idx = range(sets)
        if group == 0:
            t_q = measure.time_graph([lambda i=i: tf.quant_fp8_per_token(xs[i]) for i in idx])
            _fused_row(rep, "quant_fp8_per_token (alone)", shape, None, t_q, act + codes)
        unfused = measure.time_graph([lambda i=i: _quant(tn.rms_norm(xs[i], w, 1e-5), group) for i in idx])
        fused = measure.time_graph([lambda i=i: tf.rms_norm_quant_fp8(xs[i], w, 1e-5, group) for i in idx])
        _fused_row(rep, "rms_norm (+quant)", shape, unfused, fused, act + codes)
        unfused = measure.time_graph([lambda i=i: _quant(tn.fused_add_rms_norm(xs[i], rs[i], w, 1e-5)[0], group)
                                      for i in idx])
        for keep in (False, True):
            fused = measure.time_graph([lambda i=i, keep=keep: tf.fused_add_rms_norm_quant_fp8(xs[i], rs[i], w, 1e-5,
                                                                                               group, keep)
                                        for i in idx])
            _fused_row(rep, f"fused_add_rms_norm (+quant) keep_normed={keep}", shape, unfused, fused,
                       3 * act + codes + keep * act)
    except Exception as exc:  # noqa: BLE001 - keep measuring the rest
        rep.fail(f"fused norm {shape}", exc)


def _rounding_case(rep: Report, n_tok: int, k: int) -> None:
    """The per-token quantiser with the round to E4M3 done by `_round_e4m3` in fp32 ("unfused" column)
    against the hardware cast (what runs on sm_89 and newer): the same codes, other instruction counts."""
    shape = f"T={n_tok} K={k}"
    try:
        nbytes = n_tok * k * 3 + n_tok * 4
        xs = [torch.randn(n_tok, k, device=DEV).to(BF) for _ in range(measure.rotations(nbytes))]
        hw = measure.time_graph([lambda x=x: tf.quant_fp8_per_token(x) for x in xs])
        saved, tf.hw_round = tf.hw_round, lambda _device: False
        try:
            soft = measure.time_graph([lambda x=x: tf.quant_fp8_per_token(x) for x in xs])
            q_soft = tf.quant_fp8_per_token(xs[0])
        finally:
            tf.hw_round = saved
        q_hw = tf.quant_fp8_per_token(xs[0])
        same = torch.equal(q_soft[0].view(torch.uint8), q_hw[0].view(torch.uint8)) and torch.equal(q_soft[1], q_hw[1])
        if not same:
            raise AssertionError("hardware and software rounding give different codes")
        _fused_row(rep, "quant_fp8_per_token: software round (unfused) vs hardware cast", shape, soft, hw, nbytes)
    except Exception as exc:  # noqa: BLE001 - keep measuring the rest
        rep.fail(f"rounding {shape}", exc)


def _silu_case(rep: Report, n_tok: int, inter: int, group: int) -> None:
    shape = f"T={n_tok} I={inter} group={group}"
    try:
        codes = n_tok * inter + n_tok * 4 * (inter // group if group else 1)
        read = n_tok * 2 * inter * 2
        sets = measure.rotations(read + codes)
        xs = [torch.randn(n_tok, 2 * inter, device=DEV).to(BF) for _ in range(sets)]
        idx = range(sets)
        unfused = measure.time_graph([lambda i=i: _quant(tn.silu_and_mul(xs[i]), group) for i in idx])
        fused = measure.time_graph([lambda i=i: tf.silu_and_mul_quant_fp8(xs[i], group) for i in idx])
        _fused_row(rep, "silu_and_mul (+quant)", shape, unfused, fused, read + codes)
    except Exception as exc:  # noqa: BLE001 - keep measuring the rest
        rep.fail(f"fused silu {shape}", exc)


def _fused_row(rep: Report, op: str, shape: str, unfused: float | None, fused: float, nbytes: float) -> None:
    floor = nbytes / (rep.ceil["copy_gbs"] * 1e3)
    row = {"op": op, "shape": shape, "unfused_us": round(unfused, 2) if unfused else None,
           "fused_us": round(fused, 2), "floor_us": round(floor, 2)}
    rep.fused.append(row)
    speed = f"{unfused / fused:.2f}x" if unfused else "-"
    rep.emit("Fused FP8 producers", FUSED_HEADER,
             f"| {op} | {shape} | {f'{unfused:.1f}' if unfused else '-'} | {fused:.1f} | {speed} | {floor:.1f} | "
             f"{floor / fused:.0%} |")


# ------------------------------------------------------------------------------------ main
def summary(rows: list[dict]) -> dict:
    """Target verdicts per M band over the measured linear rows."""
    out = {}
    for band, pick in (("M<=64", lambda m: m <= 64), ("M>=2048", lambda m: m >= 2048)):
        judged = [r for r in rows if pick(r["m"]) and r["pass"] is not None]
        worst = min(judged, key=lambda r: r["us"]["bf16"] / r["us"][r["best_ch"]], default=None)
        out[band] = {"points": len(judged), "passed": sum(r["pass"] for r in judged),
                     "worst": None if worst is None else
                     f"{worst['model']} {worst['proj']} tp={worst['tp']} M={worst['m']}: "
                     f"{worst['us']['bf16'] / worst['us'][worst['best_ch']]:.2f}x"}
    return out


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="write every row, the ceilings and the summary to this JSON file")
    ap.add_argument("--models", default="glm45,air")
    ap.add_argument("--tp", default="1,2,4,8")
    ap.add_argument("--m", default=",".join(map(str, M_ALL)))
    ap.add_argument("--fused-t", default="1,64,4096")
    ap.add_argument("--sections", default="linear,fused")
    ap.add_argument("--budget-s", type=float, default=450.0)
    ap.add_argument("--update-table", type=Path, default=None, metavar="JSON",
                    help="merge the sweep's winners into this tuned-tile table (common/ops/fp8_gemm_tuned.json)")
    args = ap.parse_args()
    info = measure.device_info()
    ceil = measure.measure_ceilings() | measure.fp8_gemm_tflops()
    print(f"GPU {info}")
    print("ceilings " + " ".join(f"{k} {v:.0f}" for k, v in ceil.items()), flush=True)
    rep = Report(info, ceil, args.budget_s, args.out)
    sections = args.sections.split(",")
    if "linear" in sections:
        bench_linear(rep, args.models.split(","), _ints(args.tp), _ints(args.m))
    if "sweep" in sections:
        bench_sweep(rep, args.models.split(","), _ints(args.tp), [m for m in _ints(args.m) if m <= 64])
    if "quant-in-gemm" in sections:
        bench_quant_in_gemm(rep, args.models.split(","), [m for m in _ints(args.m) if m <= 64])
    if "accum" in sections:
        bench_accum(rep, args.models.split(","), _ints(args.m))
    if "fused" in sections:
        bench_fused(rep, _ints(args.fused_t))
    rep.save()
    if args.update_table is not None and rep.sweep:
        n = update_table(args.update_table, torch.cuda.get_device_name(), rep.sweep)
        print(f"{n} entries written to {args.update_table}", flush=True)
    print("summary " + json.dumps(rep.result()["summary"]), flush=True)
    for msg in rep.errors:
        print(msg)


if __name__ == "__main__":
    main()
