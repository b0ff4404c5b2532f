"""One TP rank's share of GLM-4.5 and GLM-4.5-Air on one GPU: what each rank will compute, hold and
communicate at TP 2, 4 and 8 (the multi-GPU run checks this prediction).

    python3 -m benchmarks.model_step.bench_tp_slices [--models glm45,air] [--tp 2,4,8] [--dtypes bf16,fp8]
        [--batches 1,8,32] [--context 1024] [--memory-only] [--tiny]

1. Memory (no GPU needed): the weight bytes rank 0 of each TP size allocates for the full-depth models
   (+ MTP layer), bf16 and FP8 (checkpoint layout: FP8 linears and experts, bf16 embedding/lm_head,
   fp32 routers), from the sharded model built on the meta device, and KV bytes per token per rank;
   then the loader on a scaled-down checkpoint written to disk (Air-like proportions, 4 layers): the
   bytes every rank of TP 1/2/4 reads and holds (common/model/loader.py reads only its slices).
2. Step time (GPU): rank 0's shard of a 4-layer slice (1 dense + 3 MoE + MTP), its collectives
   replaced by the identity, decode steps through the worker's CUDA graphs back to back at each batch
   (`context` tokens each), against the per-rank bytes/FLOPs floor of the same slice
   (benchmarks/model_step/roofline.py over the rank's widths; ceilings measured on this GPU);
   extrapolated to full depth at the same efficiency.
3. Communication per decode step (predicted, not measured here): 2 all-reduces of [B, H] bf16 per
   layer (after o_proj, after the MLP/MoE), 2 per MTP draft forward, and one gather of the logits
   [B, V] — bytes, and time at the NCCL and custom one-shot latencies published for 8 x H100 with
   NVLink multicast off (docs/performance.md lists the sources); the full-depth step is then
   predicted as compute + communication.
With OUT set, writes $OUT/bench_tp_slices.md and .json. --tiny: the flow on the CPU at tiny widths.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import measure
from benchmarks.model_step.air_model import (
    AIR,
    AIR_FULL,
    GLM45,
    GLM45_FULL,
    TINY_WIDTHS,
    random_model,
    weight_bytes_at,
)
from benchmarks.model_step.roofline import Ceilings, Shape, expected_distinct, target_parts
from common.forward.batch import ForwardBatch
from common.model.config import ModelConfig
from common.model.layers import LocalRank, kv_head_block
from common.runtime.runner import ModelRunner

PAGE = 16
MODELS = {"glm45": (GLM45, GLM45_FULL), "air": (AIR, AIR_FULL)}
# Published all-reduce latencies on 8 x H100, NVLink multicast off, eager (launch included): bytes -> µs.
# NCCL through torch.distributed and SGLang's custom one-shot/two-shot kernel (docs/performance.md).
NCCL_US = ((16 << 10, 20.7), (64 << 10, 23.0), (256 << 10, 24.8), (512 << 10, 25.2), (1 << 20, 32.0))
CUSTOM_US = ((32 << 10, 7.8), (256 << 10, 16.7), (512 << 10, 22.1), (1 << 20, 33.8))
BUS_GBS = 361.0  # NCCL bus bandwidth at 1 GiB, 8 x H100, NVLS off


def latency_us(nbytes: float, table: tuple[tuple[int, float], ...], tp: int) -> float:
    """Interpolated latency of one all-reduce of `nbytes`; past the table, its last point plus the
    ring's 2(t-1)/t bytes over the bus bandwidth."""
    if nbytes <= table[0][0]:
        return table[0][1]
    for (b0, t0), (b1, t1) in itertools.pairwise(table):
        if nbytes <= b1:
            return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)
    b_last, t_last = table[-1]
    return t_last + 2 * (tp - 1) / tp * (nbytes - b_last) / (BUS_GBS * 1e3)


def rank_config(fields: dict, tp: int) -> ModelConfig:
    """The widths one rank computes with (heads, kv heads, dense and expert width, vocabulary rows of
    lm_head split by tp; the router, norms and embedding are replicated)."""
    return ModelConfig.from_dict(dict(
        fields, num_attention_heads=fields["num_attention_heads"] // tp,
        num_key_value_heads=kv_head_block(fields["num_key_value_heads"], tp, 0)[1],
        intermediate_size=fields["intermediate_size"] // tp,
        moe_intermediate_size=fields["moe_intermediate_size"] // tp, vocab_size=fields["vocab_size"] // tp))


# ------------------------------------------------------------------------------------ memory
def memory_table(models: list[str], sizes: list[int]) -> list[dict]:
    rows = []
    for name in models:
        full = MODELS[name][1]
        layers = full["num_hidden_layers"]
        for fp8 in (False, True):
            one = weight_bytes_at(full, layers, torch.bfloat16, fp8)
            for t in [1, *sizes]:
                b = one if t == 1 else weight_bytes_at(full, layers, torch.bfloat16, fp8, tp=LocalRank(0, t))
                kv = (layers + 1) * 2 * kv_head_block(full["num_key_value_heads"], t, 0)[1] * full["head_dim"] * 2
                rows.append({"model": name, "dtype": "fp8" if fp8 else "bf16", "tp": t, "weights_gb": b / 1e9,
                             "of_tp1": b / one, "kv_kib_per_token": kv / 1024})
    return rows


def loader_table(tmp: Path, tiny: bool) -> list[dict]:
    """Bytes each rank of TP 1/2/4 reads and holds, loading a checkpoint written to disk."""
    from common.model import build_model
    from common.model.loader import load_weights
    from common.tools.tiny_model import make_tiny_model

    widths = TINY_WIDTHS if tiny else {"hidden_size": 1024, "intermediate_size": 2816, "moe_intermediate_size": 384,
                                       "num_attention_heads": 16, "num_key_value_heads": 4, "head_dim": 64,
                                       "n_routed_experts": 32, "vocab_size": 32768}
    d = make_tiny_model(tmp / "ckpt", num_layers=4, weight_dtype=torch.bfloat16, **widths)
    config = ModelConfig.from_hf(d)
    rows = []
    for t in (1, 2, 4):
        for r in range(t):
            comm = LocalRank(0, t)
            comm.rank = r
            model = build_model(config, "meta", torch.bfloat16, with_mtp=True, tp=comm)
            stats = load_weights(model, config, d, "cpu")
            held = sum(p.numel() * p.element_size() for p in model.parameters())
            rows.append({"tp": t, "rank": r, "read_mb": stats.bytes_read / 1e6, "held_mb": held / 1e6})
    return rows


# ------------------------------------------------------------------------------------ step time
def step_rows(name: str, tp: int, fp8: bool, batches: list[int], context: int, device: str, ceil: Ceilings | None,
              tiny: bool) -> list[dict]:
    fields, full = MODELS[name]
    if tiny:
        fields, full = dict(fields, **TINY_WIDTHS), dict(full, **TINY_WIDTHS)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = random_model(fields, device, dtype, fp8=fp8, tp=LocalRank(0, tp))
    pages_per_req = -(-(context + 2) // PAGE)
    runner = ModelRunner("", device, dtype, PAGE, 1 + max(batches) * pages_per_req, with_mtp=True, model=model)
    cuda = runner.device.type == "cuda"
    if cuda:
        runner.capture_decode_graphs(max(batches))
    shape, shape_full = Shape(rank_config(fields, tp), fp8, 2), Shape(rank_config(full, tp), fp8, 2)
    rows = []
    for b in batches:
        pages = [list(range(1 + i * pages_per_req, 1 + (i + 1) * pages_per_req)) for i in range(b)]
        tokens = torch.randint(0, fields["vocab_size"], (b,)).tolist()
        batch = ForwardBatch.decode(tokens, [context] * b, pages, PAGE, runner.device)
        us = _back_to_back_us(lambda batch=batch: runner.decode_logits(batch), cuda, 2 if tiny else 20)
        c = shape.c
        distinct = expected_distinct(c.n_routed_experts, c.num_experts_per_tok, b)
        moe_k = c.num_hidden_layers - c.first_k_dense_replace
        cf = shape_full.c
        moe_full = cf.num_hidden_layers - cf.first_k_dense_replace
        parts = target_parts(shape, b, b * (context + 1), b * (context + 1), [distinct] * moe_k, b)
        parts_full = target_parts(shape_full, b, b * (context + 1), b * (context + 1), [distinct] * moe_full, b)
        row = {"model": name, "dtype": "fp8" if fp8 else "bf16", "tp": tp, "batch": b, "slice_layers": c.num_hidden_layers,
               "slice_us": us}
        act = b * fields["hidden_size"] * 2
        ars = 2 * cf.num_hidden_layers
        row.update({"allreduce_bytes": act, "allreduces": ars, "gather_bytes": b * full["vocab_size"] * 2,
                    "nccl_us": ars * latency_us(act, NCCL_US, tp) + latency_us(b * full["vocab_size"] * 2, NCCL_US, tp),
                    "custom_us": ars * latency_us(act, CUSTOM_US, tp)
                    + latency_us(b * full["vocab_size"] * 2, NCCL_US, tp)})
        if ceil is not None:
            f, ff = ceil.floors(parts), ceil.floors(parts_full)
            row.update({"slice_floor_us": f["per_op_us"], "of_floor": us / f["per_op_us"],
                        "full_floor_us": ff["per_op_us"], "full_pred_us": us * ff["per_op_us"] / f["per_op_us"]})
            row["full_step_nccl_us"] = row["full_pred_us"] + row["nccl_us"]
            row["full_step_custom_us"] = row["full_pred_us"] + row["custom_us"]
        rows.append(row)
    runner.release_graphs()
    return rows


def _back_to_back_us(fn, cuda: bool, n: int) -> float:  # type: ignore[no-untyped-def]
    fn()
    runs = []
    for _ in range(5):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            runs.append(start.elapsed_time(end) * 1e3 / n)
        else:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            runs.append((time.perf_counter() - t0) * 1e6 / n)
    return statistics.median(runs[1:])


# ------------------------------------------------------------------------------------ output
def table(rows: list[dict], cols: list[str]) -> str:
    def fmt(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="glm45,air")
    p.add_argument("--tp", default="2,4,8")
    p.add_argument("--dtypes", default="bf16,fp8")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--memory-only", action="store_true", help="the memory tables only (no GPU needed)")
    p.add_argument("--tiny", action="store_true", help="the whole flow on the CPU at tiny widths")
    args = p.parse_args()
    models, sizes = args.models.split(","), [int(t) for t in args.tp.split(",")]
    out: dict[str, list[dict]] = {"memory": memory_table(models, sizes)}
    text = ["## Weights per rank (rank 0, full depth + MTP layer)\n",
            table(out["memory"], ["model", "dtype", "tp", "weights_gb", "of_tp1", "kv_kib_per_token"])]
    with tempfile.TemporaryDirectory() as tmp:
        out["loader"] = loader_table(Path(tmp), args.tiny)
    text += ["\n## Loader: bytes each rank reads and holds (4-layer checkpoint on disk)\n",
             table(out["loader"], ["tp", "rank", "read_mb", "held_mb"])]
    if not args.memory_only:
        device = "cpu" if args.tiny else "cuda"
        ceil = None
        if not args.tiny:
            c = dict(measure.measure_ceilings(), **measure.fp8_gemm_tflops())
            ceil = Ceilings(c["read_gbs"], c["gemm_tflops"], max(c["fp8_tflops"], c["fp8_fast_tflops"]))
            text.insert(0, f"device: {measure.device_info()}, ceilings: {c}\n")
        batches = [int(b) for b in args.batches.split(",")]
        out["steps"] = []
        for name in models:
            for dt in args.dtypes.split(","):
                for t in sizes if not args.tiny else [t for t in sizes if t <= 4]:  # tiny: 4 heads
                    out["steps"] += step_rows(name, t, dt == "fp8", batches, args.context, device, ceil, args.tiny)
                    torch.cuda.empty_cache() if device == "cuda" else None
        text += ["\n## Decode step of rank 0's shard (4-layer slice, graphs back to back) and its communication\n",
                 table(out["steps"], ["model", "dtype", "tp", "batch", "slice_us", "slice_floor_us", "of_floor",
                                      "full_pred_us", "allreduces", "allreduce_bytes", "nccl_us", "custom_us",
                                      "full_step_nccl_us", "full_step_custom_us"])]
    report = "\n".join(text)
    print(report)
    measure.write_out("bench_tp_slices.md", report)
    measure.write_out("bench_tp_slices.json", json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
