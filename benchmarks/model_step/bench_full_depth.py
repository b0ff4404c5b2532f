"""Full-depth GLM-4.5-Air on one GPU: FP8 in the checkpoint's layout, and bf16 at the depth that fits.

    python3 -m benchmarks.model_step.bench_full_depth [--model air] [--dtype fp8|bf16|both] [--layers N]
        [--bf16-layers N] [--batches 1,8,32,64] [--prefill 1024,8192] [--context 1024] [--spec 3,1,4]
        [--load-layers 2] [--profile 1,32] [--no-pdl-ab] [--ab prefetch=0,quant-launch-old,...] [--tiny]

1. Loader: a scaled-down real FP8 checkpoint (Air widths, --load-layers layers + MTP, official channel
   format; benchmarks/model_step/fp8_checkpoint.py) written to local disk by a child process, loaded
   through common.model.load_model onto the device from disk (page cache dropped) and again from the
   page cache: seconds, GB, GB/s, peak growth of host RSS (anonymous and mapped file pages). Deleted after.
2. FP8 model: GLM-4.5-Air, 46 layers + MTP layer (or --layers; by default the most that fit with the
   benchmark's KV at --mem-fraction-static 0.9), random weights made on the device in the FP8 layout
   (benchmarks/model_step/air_model.py): build time, parameter and allocated bytes, and the KV capacity
   of a ModelRunner sizing its pool at mem_fraction 0.9 (the decode worker's default sizing).
3. Decode step at each batch (context tokens each), through the decode CUDA graphs the worker captures,
   back to back, against its bytes roofline; the distinct routed experts come from the step's own
   routing (the expected count for uniform routing is shown next to it).
4. Prefill of each --prefill length (one sequence, chunked at --chunk like the prefill worker) against
   max(bytes / read BW, FP8 FLOPs / FP8 GEMM peak + bf16 FLOPs / bf16 GEMM peak); with the MTP draft
   extend that EAGLE adds on the prefill side as a separate column, and (GPU) with the Triton attention
   kernel in place of SDPA for the long prefills (common/attention/triton_paged.py) as another. Timed
   after the decode and EAGLE graphs are released, as in a prefill worker (which captures none), with
   the caching allocator's retries during it (a forward short of memory beside the KV pool).
5. EAGLE (S,k,N) step against the plain step (both with the worker's graphs), tokens/s at accept
   lengths 1..S+1 (accept length x batch / step time), the step against its own bytes roofline (verify
   + draft steps + draft extend), and, with the model turned into one whose draft always agrees
   (make_agreeing), EAGLE steps back to back with their measured accept length and tokens/s.
6. bf16 (--dtype both or bf16): the same at the depth that fits; with both, the FP8 model again at that
   depth (decode) for the FP8 / bf16 decode ratio at equal depth.
7. GPU, unless --no-pdl-ab: the decode graphs captured again with plain launches (common/ops/pdl.py
   off) and the decode step timed with them. --profile B,..: the kernels of each decode graph, of the
   EAGLE step at that batch and of the longest prefill under torch.profiler with plain launches,
   grouped by kernel, with the idle time between kernels. --ab NAME,..: for each variant of the served
   launch choices (benchmarks/model_step/variants.py: another weight-prefetch budget, the quantisers'
   earlier launches, attention tiles from tune_attention --decode), the decode and EAGLE graphs
   captured again inside it and timed, with the prefills, beside the served ones; then the served
   ones again (the spread within the run).

Ceilings are measured on the same GPU (benchmarks/measure.py: streaming read bandwidth, bf16 and FP8
GEMM 8192^3; the FP8 peak is the faster of fp32 and fast accumulation). Prints PASS/FAIL for the targets (decode <= 1.25x roofline at B=1, <= 1.3x at 32 and 64;
prefill of 8192 tokens <= 1.4x; EAGLE step <= 1.25x; FP8 decode >= 1.6x bf16 at equal depth) and, with
OUT set, writes $OUT/bench_full_depth.md and $OUT/bench_full_depth.json. --tiny runs the whole flow on
the CPU at tiny widths (no ceilings, so no verdicts).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks import measure
from benchmarks.model_step import full_depth_steps as steps
from benchmarks.model_step import variants
from benchmarks.model_step.air_model import (
    AIR_FULL,
    TINY_WIDTHS,
    deepen,
    parameter_bytes,
    random_model,
    weight_bytes_at,
)
from benchmarks.model_step.fp8_checkpoint import checkpoint_fields, filesystem, measure_load, write_checkpoint
from benchmarks.model_step.roofline import Ceilings, Shape
from common.model.config import eagle_step_slots
from common.ops import pdl
from common.runtime.runner import ModelRunner

PAGE = steps.PAGE
MEM_FRACTION = 0.9  # --mem-fraction-static of the KV capacity
DECODE_TARGETS = {1: 1.25, 32: 1.3, 64: 1.3}  # batch -> max step / roofline
PREFILL_TARGET = (8192, 1.4)  # tokens, max time / roofline
EAGLE_TARGET = 1.25
FP8_OVER_BF16 = 1.6  # min bf16 / FP8 decode step time at equal depth
TINY_DEFAULTS = {"batches": "1,4", "prefill": "64,256", "context": 64, "chunk": 128, "layers": 3, "load_layers": 3}
FULL_DEFAULTS = {"batches": "1,8,32,64", "prefill": "1024,8192", "context": 1024, "chunk": 8192, "load_layers": 2}


def full_fields(tiny: bool) -> dict:
    return dict(AIR_FULL, **TINY_WIDTHS) if tiny else dict(AIR_FULL)


def act_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ------------------------------------------------------------------------------------ sizing
def pages_per_request(args: argparse.Namespace) -> int:
    """Context, the agreeing run's committed tokens and one EAGLE step's scratch slots."""
    s, k, n = args.spec
    agree = 2 + effort(args).agree_steps
    return -(-(args.context + agree * (s + 1) + eagle_step_slots(s, k, n)) // PAGE)


def effort(args: argparse.Namespace) -> steps.Effort:
    base = steps.TINY if args.tiny else steps.FULL
    return replace(base, reps=args.reps) if args.reps else base


def kv_tokens_needed(args: argparse.Namespace) -> int:
    return (1 + max(args.batches) * pages_per_request(args) + -(-max(args.prefill) // PAGE)) * PAGE


def fit_layers(args: argparse.Namespace, device: torch.device, fp8: bool) -> int:
    """The most layers (<= the model's) whose weights and the benchmark's KV fit in mem_fraction of the
    GPU (1 GiB kept for what the runner holds besides: RoPE table, graphs' static inputs)."""
    fields, dtype = full_fields(args.tiny), act_dtype(device)
    total = torch.cuda.get_device_properties(device).total_memory
    budget = MEM_FRACTION * total - torch.cuda.memory_reserved(device) - (1 << 30)
    w2 = weight_bytes_at(fields, 2, dtype, fp8)
    per_layer = weight_bytes_at(fields, 3, dtype, fp8) - w2
    kv_layer = 2 * fields["num_key_value_heads"] * fields["head_dim"] * dtype.itemsize * kv_tokens_needed(args)
    for layers in range(fields["num_hidden_layers"], 1, -1):
        if w2 + (layers - 2) * per_layer + (layers + 1) * kv_layer <= budget:
            return layers
    raise SystemExit(f"not even 2 layers ({'FP8' if fp8 else 'bf16'}) fit with the benchmark's KV")


# ------------------------------------------------------------------------------------ stages
def loader_stage(args: argparse.Namespace, device: torch.device) -> dict:
    """Write the scaled-down FP8 checkpoint, load it cold and warm, delete it."""
    fields = checkpoint_fields(args.load_layers, args.tiny)
    size = weight_bytes_at(fields, args.load_layers, torch.bfloat16, fp8=True)
    out: dict = {"layers": args.load_layers, "widths": "tiny" if args.tiny else "Air"}
    root = Path(tempfile.mkdtemp(prefix="glmserve_fp8_ckpt_", dir=args.ckpt_dir))
    try:
        free = shutil.disk_usage(root).free
        if size * 1.2 > free:
            return dict(out, skipped=f"the checkpoint needs {size / 1e9:.1f} GB, {free / 1e9:.1f} GB free under {root}")
        path = root / "model"
        start = time.perf_counter()
        if args.tiny:
            write_checkpoint(path, fields, device)
        else:  # a child process: the writer's host memory never blurs the loader's RSS
            subprocess.run([sys.executable, "-m", "benchmarks.model_step.fp8_checkpoint", str(path),
                            "--layers", str(args.load_layers)], check=True)
        out.update(write_s=time.perf_counter() - start, filesystem=filesystem(root), loads=[])
        for cold in (True, False):
            out["loads"].append(measure_load(path, device, act_dtype(device), cold))
            _release(device)  # the loaded model, before the next load
            print(f"load ({'disk' if cold else 'page cache'}): {_load_line(out['loads'][-1])}", flush=True)
        return out
    finally:
        shutil.rmtree(root, ignore_errors=True)


def model_stage(args: argparse.Namespace, device: torch.device, fp8: bool, layers: int, ceil: Ceilings | None,
                decode_only: bool = False) -> dict:
    """Build one model on the device and measure it (decode; unless decode_only prefill and EAGLE too)."""
    dtype, cuda = act_dtype(device), device.type == "cuda"
    name = f"{'FP8' if fp8 else 'bf16'} {layers} layers"
    _sync(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    start = time.perf_counter()
    distinct = min(layers, args.distinct_layers or layers)
    model = random_model(dict(full_fields(args.tiny), num_hidden_layers=distinct), device, dtype, fp8=fp8)
    deepen(model, layers)  # layers past `distinct` share the weights of earlier ones
    _sync(device)
    info = {"dtype": "fp8" if fp8 else "bf16", "layers": layers, "distinct_layers": distinct,
            "build_s": time.perf_counter() - start,
            "weights_gb": weight_bytes_at(full_fields(args.tiny), layers, dtype, fp8) / 1e9,
            "held_gb": parameter_bytes(model) / 1e9,
            "allocated_gb": (torch.cuda.memory_allocated(device) - base) / 1e9 if cuda else None}
    runner = ModelRunner("", device, dtype, PAGE, 0, with_mtp=True, mem_fraction=MEM_FRACTION, model=model)
    pool = runner.kv_pool
    tokens = (pool.num_pages - 1) * PAGE
    info["kv"] = {"mem_fraction": MEM_FRACTION, "pages": pool.num_pages, "tokens": tokens,
                  "gb": pool.kv.numel() * pool.kv.element_size() / 1e9, "bytes_per_token": pool.bytes_per_token,
                  # the pool sized with every layer's own weights held: what the GPU would keep for KV
                  "tokens_if_distinct": tokens - round((info["weights_gb"] - info["held_gb"]) * 1e9
                                                       / pool.bytes_per_token)}
    print(f"{name}: built in {info['build_s']:.1f} s, weights {info['weights_gb']:.2f} GB ({distinct} distinct "
          f"layers held: {info['held_gb']:.2f} GB), KV {tokens} tokens ({info['kv']['gb']:.1f} GB)", flush=True)
    shape = Shape(model.config, fp8, dtype.itemsize)
    st = steps.Stage.build(runner, shape, ceil, args.context, args.spec, effort(args), pages_per_request(args),
                           max(args.batches), -(-max(args.prefill) // PAGE))
    if cuda:
        start = time.perf_counter()
        runner.capture_decode_graphs(max(args.batches))
        if not decode_only:
            runner.capture_spec_graphs(max(args.batches), *args.spec)
        info["capture_s"] = time.perf_counter() - start
    try:
        info["decode"] = _each(name, "decode", [lambda b=b: steps.decode(st, b) for b in args.batches])
        if not decode_only:
            info["eagle"] = _each(name, "EAGLE", [lambda b=b: steps.eagle(st, b) for b in args.batches])
            info["agreeing"] = steps.agreeing_all(st, args.batches)
            for row in info["agreeing"]:
                print(f"{name} EAGLE agreeing draft B={row['batch']}: accept length {row['accept_length']:.2f}, "
                      f"{row['tok_s']:.0f} tok/s", flush=True)
            # a prefill worker holds no decode graphs: their memory would leave the prefill's temporaries
            # short of room beside the KV pool (the allocator's retries show it)
            runner.release_graphs()
            info["prefill"] = _each(name, "prefill", [lambda n=n: steps.prefill(st, n, args.chunk)
                                                      for n in args.prefill])
        if args.ab and not decode_only:  # on the CPU (--tiny) the graphs are not captured: eager steps
            info["prefetch_mb"] = pdl.PREFETCH_BYTES / 1e6
            info["ab"] = ab_stage(runner, st, args)
        if args.trace and cuda and not decode_only and measure.out_dir() is not None:
            if not runner.graphs:  # released for the prefills: the traced EAGLE step runs the worker's graphs
                runner.capture_decode_graphs(max(args.batches))
                runner.capture_spec_graphs(max(args.batches), *args.spec)
            info["traces"] = steps.trace(st, args.trace, max(args.prefill), args.chunk, measure.out_dir())
        if (args.pdl_ab or args.profile) and cuda and not decode_only:
            # the decode graphs (and for the profile the EAGLE ones) again with plain launches: timed against
            # the PDL ones, and profiled (under PDL a kernel starts early and waits, so its profiled time
            # would include its predecessor's)
            runner.release_graphs()
            saved, pdl.ENABLED = pdl.ENABLED, False
            try:
                runner.capture_decode_graphs(max(args.batches))
                if args.pdl_ab:
                    info["decode_plain_launch"] = _each(name, "decode, plain launches",
                                                        [lambda b=b: steps.decode(st, b) for b in args.batches])
                if args.profile:
                    runner.capture_spec_graphs(max(args.batches), *args.spec)
                    info["profile"] = steps.profile(st, args.profile, max(args.prefill), args.chunk, eagle=True)
                    print("\n".join(info["profile"]), flush=True)
            finally:
                pdl.ENABLED = saved
    finally:
        runner.release_graphs()
    return info


def ab_stage(runner: ModelRunner, st: steps.Stage, args: argparse.Namespace) -> list[dict]:
    """Each --ab variant (benchmarks/model_step/variants.py), then the served choices again: the decode
    and EAGLE graphs captured again inside it and timed as the served ones, and the target forwards of
    each prefill length."""
    rows = []
    try:
        for name in [*args.ab, "served again"]:
            runner.release_graphs()
            with variants.variant(name) if name != "served again" else contextlib.nullcontext():
                if st.cuda:
                    runner.capture_decode_graphs(max(args.batches))
                    runner.capture_spec_graphs(max(args.batches), *args.spec)
                row = {
                    "variant": name,
                    "decode": _each("", f"decode, {name}", [lambda b=b: steps.decode(st, b) for b in args.batches]),
                    "eagle": _each("", f"EAGLE, {name}", [lambda b=b: steps.eagle(st, b) for b in args.batches])}
                runner.release_graphs()  # as for the served prefill
                row["prefill"] = _each("", f"prefill, {name}", [lambda n=n: steps.prefill_target_us(st, n, args.chunk)
                                                               for n in args.prefill])
                rows.append(row)
    finally:
        runner.release_graphs()
    return rows


def _each(name: str, what: str, jobs: list) -> list[dict]:
    rows = []
    for job in jobs:
        rows.append(job())
        row = rows[-1]
        key = "tokens" if "tokens" in row else "batch"
        floor = f", roofline {row['roofline_us']:.0f} us" if "roofline_us" in row else ""
        print(f"{name} {what} {key}={row[key]}: {row['measured_us']:.0f} us{floor}", flush=True)
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _release(device: torch.device) -> None:
    gc.collect()  # the runner and its graphs hold each other
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------ verdicts
def verdicts(report: dict) -> list[str]:
    """PASS / FAIL (n/a without ceilings) per target."""
    lines = []

    def check(what: str, value: float | None, limit: float, at_most: bool) -> None:
        if value is None:
            lines.append(f"n/a  {what} (no ceilings measured)")
            return
        ok = value <= limit if at_most else value >= limit
        lines.append(f"{'PASS' if ok else 'FAIL'} {what}: {value:.2f}x (target {'<=' if at_most else '>='} "
                     f"{limit}x)")

    def ratio(row: dict) -> float | None:
        return row["measured_us"] / row["roofline_us"] if "roofline_us" in row else None

    fp8 = report.get("fp8")
    if fp8:
        depth = f"FP8 {fp8['layers']} layers"
        for row in fp8["decode"]:
            if row["batch"] in DECODE_TARGETS:
                check(f"{depth} decode B={row['batch']} vs bytes roofline", ratio(row), DECODE_TARGETS[row["batch"]],
                      True)
        for row in fp8["prefill"]:
            if row["tokens"] == PREFILL_TARGET[0]:
                check(f"{depth} prefill {row['tokens']} vs roofline", ratio(row), PREFILL_TARGET[1], True)
        for row in fp8["eagle"]:
            check(f"{depth} EAGLE step B={row['batch']} vs bytes roofline", ratio(row), EAGLE_TARGET, True)
    for row in report.get("fp8_vs_bf16", []):  # wall-clock ratios on the CPU are no verdict either
        check(f"FP8 / bf16 decode speed at {row['layers']} layers B={row['batch']}",
              row["speedup"] if report["ceilings"] else None, FP8_OVER_BF16, False)
    return lines


def compare(fp8: dict, bf16: dict) -> list[dict]:
    """Decode step FP8 vs bf16 at equal depth."""
    rows = []
    for f, b in zip(fp8["decode"], bf16["decode"]):
        layers = bf16["layers"]
        rows.append({"batch": f["batch"], "layers": layers, "fp8_us": f["measured_us"], "bf16_us": b["measured_us"],
                     "speedup": b["measured_us"] / f["measured_us"], "fp8_per_layer_us": f["measured_us"] / layers,
                     "bf16_per_layer_us": b["measured_us"] / layers})
    return rows


# ------------------------------------------------------------------------------------ report
def _f(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def _x(row: dict) -> str:
    return _f(row["measured_us"] / row["roofline_us"], ".2f") if "roofline_us" in row else "-"


def _load_line(row: dict) -> str:
    return (f"{row['gb']:.2f} GB in {row['seconds']:.1f} s = {row['gb_per_s']:.2f} GB/s, host RSS "
            f"+{row['rss_growth_gb']:.2f} GB (anon +{row['anon_growth_gb']:.2f}, file +{row['file_growth_gb']:.2f}), FP8 modules "
            f"{row['fp8_modules']}/{row['fp8_capable']}")


def markdown(report: dict) -> str:
    out = [f"# Full-depth GLM-4.5-Air on one GPU ({report['device']}, {report['date']})", ""]
    if report.get("ceilings"):
        c = report["ceilings"]
        out += [(f"Ceilings: read {c['read_gbs']:.0f} GB/s, bf16 GEMM {c['gemm_tflops']:.0f} TFLOP/s, FP8 GEMM "
                 f"{c['fp8_tflops']:.0f} TFLOP/s ({c['fp8_fast_tflops']:.0f} with fast accumulation; the "
                 "rooflines use the larger)."), ""]
    load = report.get("loader")
    if load:
        out += [f"## Loader: FP8 checkpoint of {load['layers']} layers + MTP at {load['widths']} widths", ""]
        if "skipped" in load:
            out += [f"skipped: {load['skipped']}", ""]
        else:
            out += [(f"written in {load['write_s']:.1f} s (filesystem {load['filesystem']}); \"disk\": its pages "
                     "dropped from the page cache first"), ""]
            out += _table(["from", "GB", "s", "GB/s", "host RSS growth GB", "anon GB", "file pages GB", "FP8 modules"],
                          [["disk" if r["cold"] else "page cache", _f(r["gb"], ".2f"), _f(r["seconds"], ".2f"),
                            _f(r["gb_per_s"], ".2f"), _f(r["rss_growth_gb"], ".2f"), _f(r["anon_growth_gb"], ".2f"),
                            _f(r["file_growth_gb"], ".2f"), f"{r['fp8_modules']}/{r['fp8_capable']}"]
                           for r in load["loads"]]) + [""]
    for key in ("fp8", "bf16", "fp8_at_bf16_depth"):
        if key in report:
            out += _model_md(report[key], report["spec"])
    if report.get("fp8_vs_bf16"):
        out += ["## FP8 vs bf16 decode at equal depth", ""]
        out += _table(["B", "layers", "FP8 us", "bf16 us", "bf16 / FP8", "FP8 us/layer", "bf16 us/layer"],
                      [[str(r["batch"]), str(r["layers"]), _f(r["fp8_us"]), _f(r["bf16_us"]), _f(r["speedup"], ".2f"),
                        _f(r["fp8_per_layer_us"], ".1f"), _f(r["bf16_per_layer_us"], ".1f")]
                       for r in report["fp8_vs_bf16"]]) + [""]
    verdict = report.get("verdicts") or ["(none: the targets are the FP8 model's)"]
    return "\n".join([*out, "## Targets", "", *verdict, ""])


def _model_md(m: dict, spec: tuple[int, int, int]) -> list[str]:
    kv = m["kv"]
    shared = m.get("distinct_layers", m["layers"]) < m["layers"]
    capacity = (f"{kv['tokens']} tokens ({kv['gb']:.1f} GB, {kv['bytes_per_token'] / 1e3:.0f} KB/token)" if not shared
                else f"{kv['tokens_if_distinct']} tokens with every layer's weights held "
                     f"({kv['tokens']} in this run's pool, {kv['bytes_per_token'] / 1e3:.0f} KB/token)")
    summary = (f"weights {m['weights_gb']:.2f} GB (allocated {_f(m['allocated_gb'], '.2f')} GB), built in "
               f"{m['build_s']:.1f} s; KV at --mem-fraction-static {kv['mem_fraction']}: {capacity}; graphs "
               f"captured in {_f(m.get('capture_s'), '.1f')} s")
    if shared:
        summary += (f". Layers {m['distinct_layers']}..{m['layers'] - 1} share the weights of the earlier MoE "
                    f"layers in turn (the GPU holds {m['held_gb']:.2f} GB of them); each reads its weights from "
                    "memory all the same, so steps and rooflines are the full model's")
    out = [f"## {m['dtype']} model, {m['layers']} layers + MTP", "", summary, ""]
    out += ["### Decode step (graph, back to back)", ""]
    out += _table(["B", "ctx", "experts/layer (routing / uniform)", "GB", "bytes floor us", "compute floor us",
                   "step us", "isolated us", "x roofline", "us/layer", "tok/s"],
                  [[str(r["batch"]), str(r["context"]), f"{r['distinct_actual']:.1f} / {r['distinct_formula']:.1f}",
                    _f(r["bytes_gb"], ".2f"), _f(r.get("bytes_us")), _f(r.get("compute_us")), _f(r["measured_us"]),
                    _f(r["graph_us"]), _x(r), _f(r["per_layer_us"], ".1f"), _f(r["tok_s"])] for r in m["decode"]])
    if "prefill" in m:
        out += ["", "### Prefill (one sequence)", ""]
        out += _table(["tokens", "chunks", "FP8 TFLOP", "bf16 TFLOP", "GB", "compute floor us", "bytes floor us",
                       "per-op floor us", "forward us", "x roofline", "tok/s", "+ MTP extend us",
                       "with the Triton attention us", "allocator retries"],
                      [[str(r["tokens"]), str(r["chunks"]), _f(r["fp8_tflop"], ".2f"), _f(r["other_tflop"], ".2f"),
                        _f(r["bytes_gb"], ".2f"), _f(r.get("compute_us")), _f(r.get("bytes_us")),
                        _f(r.get("per_op_us")), _f(r["measured_us"]), _x(r), _f(r["tok_s"]), _f(r["with_draft_us"]),
                        _f(r.get("triton_attention_us")), str(r.get("alloc_retries", "-"))]
                       for r in m["prefill"]])
        out += ["", "Timed with the decode graphs released, as a prefill worker holds none."]
    if "eagle" in m:
        s, k, n = spec
        accepts = range(1, s + 2)
        out += ["", f"### EAGLE ({s},{k},{n}) step vs plain step (worker graphs, from an idle GPU)", ""]
        agree = {r["batch"]: r for r in m.get("agreeing", [])}
        out += _table(["B", "plain us", "EAGLE us", "EAGLE / plain", "GB", "bytes floor us", "x roofline",
                       "plain tok/s", *(f"tok/s @ {a}" for a in accepts), "agreeing: accept", "agreeing tok/s"],
                      [[str(r["batch"]), _f(r["plain_step_us"]), _f(r["eagle_step_us"]),
                        _f(r["eagle_over_plain"], ".2f"), _f(r["bytes_gb"], ".2f"), _f(r.get("bytes_us")), _x(r),
                        _f(r["plain_tok_s"]), *(_f(r["eagle_tok_s"][a]) for a in accepts),
                        _f(agree.get(r["batch"], {}).get("accept_length"), ".2f"),
                        _f(agree.get(r["batch"], {}).get("tok_s"))] for r in m["eagle"]])
    if m.get("decode_plain_launch"):
        plain = {r["batch"]: r for r in m["decode_plain_launch"]}
        out += ["", "### Decode step with programmatic dependent launches against plain launches", ""]
        out += _table(["B", "PDL us", "plain us", "plain / PDL"],
                      [[str(r["batch"]), _f(r["measured_us"]), _f(plain[r["batch"]]["measured_us"]),
                        _f(plain[r["batch"]]["measured_us"] / r["measured_us"], ".3f")]
                       for r in m["decode"] if r["batch"] in plain])
    if m.get("ab"):
        out += ["", f"### Served launch choices against variants (prefetch {m['prefetch_mb']:g} MB a launch served)", ""]
        served = {("decode", r["batch"]): r["measured_us"] for r in m["decode"]}
        served |= {("EAGLE", r["batch"]): r["eagle_step_us"] for r in m.get("eagle", [])}
        served |= {("prefill", r["tokens"]): r["measured_us"] for r in m.get("prefill", [])}
        fields = {"decode": ("decode", "batch", "measured_us"), "EAGLE": ("eagle", "batch", "eagle_step_us"),
                  "prefill": ("prefill", "tokens", "measured_us")}
        cells = []
        for (step, n), us in served.items():
            key, by, field = fields[step]
            times = [next((r[field] for r in v[key] if r[by] == n), None) for v in m["ab"]]
            cells.append([step, str(n), _f(us), *(f"{_f(t)} ({_f(t / us if t else None, '.3f')})" for t in times)])
        out += _table(["step", "B / tokens", "served us", *(f"{v['variant']} us (/ served)" for v in m["ab"])], cells)
    if m.get("profile"):
        out += ["", "### Per-kernel profile (plain launches)", "", *m["profile"]]
    return [*out, ""]


# ------------------------------------------------------------------------------------ main
def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("air",), default="air")
    ap.add_argument("--dtype", choices=("fp8", "bf16", "both"), default="both")
    ap.add_argument("--layers", type=int, help="FP8 depth (default: 46, or the most that fit)")
    ap.add_argument("--distinct-layers", type=int, default=0,
                    help="build this many layers and let the rest of --layers share their weights (a GPU "
                         "too small for the whole model times its full depth; 0: every layer its own)")
    ap.add_argument("--bf16-layers", type=int, help="bf16 depth (default: the most that fit)")
    ap.add_argument("--batches", help="decode / EAGLE batch sizes (default 1,8,32,64)")
    ap.add_argument("--prefill", help="prefill lengths (default 1024,8192)")
    ap.add_argument("--context", type=int, help="tokens of KV per decoding request (default 1024)")
    ap.add_argument("--chunk", type=int, help="prefill chunk (the prefill worker's --chunked-prefill-size, 8192)")
    ap.add_argument("--spec", default="3,1,4", help="EAGLE num_steps,topk,num_draft_tokens")
    ap.add_argument("--reps", type=int, help="timed repetitions of an isolated step (default 10; --tiny 1)")
    ap.add_argument("--load-layers", type=int, help="layers of the loader's checkpoint (default 2; 0 skips it)")
    ap.add_argument("--ckpt-dir", default=None, help="where the loader's checkpoint is written (default: temp dir)")
    ap.add_argument("--profile", default="", help="decode and EAGLE batches to profile per kernel (e.g. 1,32), with the "
                    "longest prefill; the FP8 model's sections go to the report (GPU only)")
    ap.add_argument("--trace", default="", help="EAGLE batches (e.g. 64) whose step, and the longest prefill, are "
                    "written to $OUT as Chrome traces with host stacks (GPU only)")
    ap.add_argument("--no-pdl-ab", dest="pdl_ab", action="store_false",
                    help="skip the decode steps with plain launches (GPU: graphs captured again without PDL)")
    ap.add_argument("--prefetch-ab", default="", help="weight-prefetch budgets (MB a launch, e.g. 0,8): the same as "
                    "--ab prefetch=0,prefetch=8")
    ap.add_argument("--ab", default="", help="variants of the served launch choices (benchmarks/model_step/variants.py: "
                    f"{', '.join(variants.VARIANTS)}) whose decode and EAGLE graphs are captured again and timed, "
                    "with the prefills, beside the served ones")
    ap.add_argument("--tiny", action="store_true", help="tiny widths on the CPU: the whole flow, no verdicts")
    args = ap.parse_args(argv)
    for key, value in (TINY_DEFAULTS if args.tiny else FULL_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.batches = [int(b) for b in str(args.batches).split(",")]
    args.prefill = [int(n) for n in str(args.prefill).split(",")]
    args.spec = tuple(int(x) for x in args.spec.split(","))
    args.profile = [int(b) for b in args.profile.split(",") if b]
    args.trace = [int(b) for b in args.trace.split(",") if b]
    args.ab = variants.parse(",".join([f"prefetch={mb}" for mb in args.prefetch_ab.split(",") if mb] + [args.ab]))
    return args


def run(args: argparse.Namespace, save: Callable[[dict], None] | None = None) -> dict:
    """The whole flow; save(report) after each stage (a run cut short keeps what it measured)."""
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type != "cuda" and not args.tiny:
        raise SystemExit("bench_full_depth needs a CUDA GPU (or --tiny for the CPU flow)")
    torch.manual_seed(0)
    report: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                    "date": time.strftime("%Y-%m-%d"), "spec": args.spec, "ceilings": None}

    def done(key: str, value: dict) -> dict:
        report[key] = value
        report["verdicts"] = verdicts(report)
        if save is not None:
            save(report)
        _release(device)
        return value

    ceil = None
    if device.type == "cuda":
        out = measure.out_dir()
        report["ceilings"] = c = dict(measure.measure_ceilings(out / "ceilings.json" if out else None),
                                      **measure.fp8_gemm_tflops())
        torch.cuda.empty_cache()
        # the FP8 peak a kernel is held to: the faster of fp32 and fast accumulation
        ceil = Ceilings(c["read_gbs"], c["gemm_tflops"], max(c["fp8_tflops"], c["fp8_fast_tflops"]))
        print(f"GPU {report['device']}; ceilings {c}", flush=True)
    if args.load_layers:
        try:
            done("loader", loader_stage(args, device))
        except (OSError, subprocess.CalledProcessError, RuntimeError) as e:  # the models' numbers still come
            print(f"loader stage failed: {type(e).__name__}: {e}", flush=True)
            done("loader", {"layers": args.load_layers, "widths": "tiny" if args.tiny else "Air",
                            "skipped": f"failed: {type(e).__name__}: {e}"})

    def depth(requested: int | None, fp8: bool) -> int:
        if requested:
            return requested
        return fit_layers(args, device, fp8) if device.type == "cuda" else TINY_DEFAULTS["layers"]

    fp8_layers = None
    if args.dtype in ("fp8", "both"):
        fp8_layers = depth(args.layers, True)
        done("fp8", model_stage(args, device, True, fp8_layers, ceil))
    if args.dtype in ("bf16", "both"):
        bf16_layers = depth(args.bf16_layers, False)
        done("bf16", model_stage(args, device, False, bf16_layers, ceil))
        if args.dtype == "both":
            fp8_equal = report["fp8"]
            if bf16_layers != fp8_layers:
                fp8_equal = done("fp8_at_bf16_depth", model_stage(args, device, True, bf16_layers, ceil, True))
            report["fp8_vs_bf16"] = compare(fp8_equal, report["bf16"])
    report["verdicts"] = verdicts(report)
    return report


def save(report: dict) -> None:
    measure.write_out("bench_full_depth.md", markdown(report))
    measure.write_out("bench_full_depth.json", json.dumps(report, indent=1, default=str))


def main() -> None:
    args = parse()
    torch.set_grad_enabled(False)
    if args.tiny:  # at tiny widths intra-op threads only add synchronisation (and stall on a busy CPU)
        torch.set_num_threads(1)
    report = run(args, save)
    save(report)
    print(markdown(report))


if __name__ == "__main__":
    main()
