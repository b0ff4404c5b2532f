"""Decode step, EAGLE step and prefill of a tensor-parallel worker with real collectives: N rank
processes (common.worker.ranks.start_ranks, the worker's own code path) on N GPUs, dummy weights
(--load-format dummy) of GLM-4.5 or GLM-4.5-Air at full depth or a given depth, the decode worker's
CUDA graphs captured on every rank; timed on rank 0 against the per-rank roofline plus the predicted
all-reduce time (docs/performance.md §6: NCCL and one-shot latencies for 8 x H100 with NVLink
multicast off, as benchmarks/model_step/bench_tp_slices.py predicts them).

    python3 -m benchmarks.model_step.bench_tp_step --tp 4 --model air                     # 4 GPUs, Air full depth bf16
    python3 -m benchmarks.model_step.bench_tp_step --tp 8 --model glm45 --dtype fp8       # 8 GPUs, GLM-4.5 full FP8
    python3 -m benchmarks.model_step.bench_tp_step --tiny --tp 2                          # CPU, gloo, tiny widths

Measured (benchmarks/model_step/full_depth_steps.py, on rank 0, the followers running each step in
lockstep): the plain decode step at each --batches (graph replay, isolated and back to back), the
EAGLE (S,k,N) step at each batch (verify + draft steps + draft extend, graphs; its roofline with the
expected number of distinct experts), and one prefill of --prefill tokens in --chunk chunks. Each row shows the rank's roofline floor (bytes/FLOPs of the
rank's shard: heads, expert and dense widths and vocabulary rows divided by the TP size), the
predicted communication (2 all-reduces of [T, H] bf16 per layer and per MTP forward, and the
[R, V] logits gather), their sum, and measured / sum. The model directory holds config.json only
(the checkpoint's layout: FP8 per output channel with --dtype fp8, as GLM-4.5-FP8 stores it).
With OUT set, writes $OUT/bench_tp_step_<model>_tp<N>_<dtype>.md and .json, and appends the table to
$OUT/bench_tp_step.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import measure
from benchmarks.model_step import full_depth_steps as steps
from benchmarks.model_step.air_model import AIR_FULL, GLM45_FULL, TINY_WIDTHS
from benchmarks.model_step.bench_tp_slices import CUSTOM_US, NCCL_US, latency_us, rank_config
from benchmarks.model_step.roofline import Ceilings, Shape, expected_distinct
from common.runtime.distributed import TPConfig
from common.runtime.runner import RunnerSpec
from common.tools.tiny_model import fp8_quantization_config
from common.worker.ranks import start_ranks

PAGE = steps.PAGE
MODELS = {"glm45": GLM45_FULL, "air": AIR_FULL}


def write_config(path: Path, fields: dict, fp8: bool) -> Path:
    """A model directory holding config.json alone (what --load-format dummy needs)."""
    fields = dict(fields)
    if fp8:
        fields["quantization_config"] = fp8_quantization_config("fp8-channel", fields, 0)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(fields, indent=1))
    return path


def comm_us(tokens: int, allreduces: int, gather_rows: int, hidden: int, vocab: int, tp: int) -> dict:
    """Predicted time of `allreduces` all-reduces of [tokens, hidden] bf16 and one gather of the
    [gather_rows, vocab] logits (NCCL, and with the one-shot kernel for the all-reduces)."""
    act, logits = tokens * hidden * 2, gather_rows * vocab * 2
    gather = latency_us(logits, NCCL_US, tp) if gather_rows else 0.0
    return {"allreduces": allreduces, "allreduce_bytes": act,
            "comm_nccl_us": allreduces * latency_us(act, NCCL_US, tp) + gather,
            "comm_custom_us": allreduces * latency_us(act, CUSTOM_US, tp) + gather}


def annotate(row: dict, comm: dict) -> dict:
    row.update(comm)
    if "per_op_us" in row:
        for kind in ("nccl", "custom"):
            row[f"floor_plus_{kind}_us"] = row["per_op_us"] + comm[f"comm_{kind}_us"]
        row["of_floor_plus_comm"] = row["measured_us"] / row["floor_plus_custom_us"]
    return row


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tp", type=int, default=4, help="ranks (one GPU each from --base-gpu-id)")
    p.add_argument("--model", default="air", choices=tuple(MODELS))
    p.add_argument("--layers", type=int, default=0, help="decoder layers (0: full depth)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp8"), help="weights (activations bf16)")
    p.add_argument("--batches", default="1,32,64")
    p.add_argument("--context", type=int, default=1024, help="cached tokens of each decoding request")
    p.add_argument("--prefill", type=int, default=8192, help="prompt tokens of the prefill (0: none)")
    p.add_argument("--chunk", type=int, default=8192, help="prefill chunk (the prefill worker's budget)")
    p.add_argument("--spec", default="3,1,4", help="EAGLE S,k,N ('' : no EAGLE step)")
    p.add_argument("--base-gpu-id", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=("auto", "nccl", "gloo"))
    p.add_argument("--disable-custom-all-reduce", action="store_true")
    p.add_argument("--mem-fraction", type=float, default=0.85)
    p.add_argument("--tiny", action="store_true", help="CPU, gloo, tiny widths, 2 layers, small sizes")
    args = p.parse_args(argv)
    if args.tiny:
        args.layers, args.batches, args.context, args.prefill, args.chunk = args.layers or 2, "1,2", 24, 40, 16
    return args


def run(args: argparse.Namespace, work: Path) -> dict:
    fields = dict(MODELS[args.model], **(TINY_WIDTHS if args.tiny else {}))
    if args.layers:  # a shallower model keeps at least one MoE layer
        fields.update(num_hidden_layers=args.layers,
                      first_k_dense_replace=min(fields["first_k_dense_replace"], args.layers - 1))
    fp8, batches = args.dtype == "fp8", [int(b) for b in args.batches.split(",")]
    spec = tuple(int(x) for x in args.spec.split(",")) if args.spec else None
    device = "cpu" if args.tiny else f"cuda:{args.base_gpu_id}"
    cuda = device.startswith("cuda")
    model_dir = write_config(work / "model", fields, fp8)
    pages_per_req = -(-(args.context + 2 + (spec[2] if spec else 0) * 2) // PAGE)
    prefill_pages = -(-args.prefill // PAGE) + 1
    num_pages = 1 + max(batches) * pages_per_req + prefill_pages
    dtype = "bfloat16" if cuda else "float32"
    rspec = RunnerSpec(str(model_dir), dtype, PAGE, num_pages, with_mtp=spec is not None,
                       mem_fraction=args.mem_fraction, load_format="dummy")
    tp = TPConfig.resolve(args.tp, device, args.backend, base_gpu_id=None if args.tiny else args.base_gpu_id,
                          custom_all_reduce=not args.disable_custom_all_reduce)
    ceil = None
    info: dict = {"model": args.model, "layers": fields["num_hidden_layers"], "dtype": args.dtype, "tp": args.tp,
                  "devices": list(tp.devices), "backend": tp.backend, "context": args.context, "spec": spec}
    if cuda:
        c = dict(measure.measure_ceilings(), **measure.fp8_gemm_tflops())
        ceil = Ceilings(c["read_gbs"], c["gemm_tflops"], max(c["fp8_tflops"], c["fp8_fast_tflops"]))
        info["ceilings"], info["device"] = c, measure.device_info()
        torch.cuda.empty_cache()
    elif args.tiny:  # nominal, not measured: the floor arithmetic runs on the CPU too
        ceil = Ceilings(20.0, 0.5, 0.5)
        info["ceilings"] = "nominal CPU (20 GB/s, 0.5 TFLOP/s)"
    start = time.perf_counter()
    runner, ranks = start_ranks(rspec, tp, role="bench")
    info["start_s"] = time.perf_counter() - start
    if cuda:
        info["weights_gb_rank0"] = sum(p.numel() * p.element_size() for p in runner.model.parameters()) / 1e9
    print(f"TP {args.tp} ({tp.backend} on {', '.join(tp.devices)}): ranks up with dummy weights in "
          f"{info['start_s']:.1f} s", flush=True)
    shape = Shape(rank_config(fields, args.tp), fp8, 2)
    effort = steps.TINY if args.tiny else steps.FULL
    try:
        st = steps.Stage.build(runner, shape, ceil, args.context, spec or (1, 1, 2), effort, pages_per_req,
                               max(batches), prefill_pages)
        if cuda:
            t = time.perf_counter()
            runner.capture_decode_graphs(max(batches))
            if spec:
                runner.capture_spec_graphs(max(batches), *spec)
            info["capture_s"] = time.perf_counter() - t
        h, v, layers = fields["hidden_size"], fields["vocab_size"], fields["num_hidden_layers"]
        info["decode"] = [annotate(steps.decode(st, b), comm_us(b, 2 * layers, b, h, v, args.tp)) for b in batches]
        if spec:
            # verify: the target over B*N tokens; S-1 draft steps over B*k; the extend over B*(S+1)
            info["eagle"] = [annotate(eagle_row(st, b),
                                      _eagle_comm(b, spec, layers, h, v, args.tp)) for b in batches]
        if args.prefill:
            spans = [min(args.chunk, args.prefill - s) for s in range(0, args.prefill, args.chunk)]
            per = [comm_us(t, 2 * layers, 1 if i == len(spans) - 1 else 0, h, v, args.tp) for i, t in enumerate(spans)]
            comm = {"allreduces": sum(p["allreduces"] for p in per), "allreduce_bytes": per[0]["allreduce_bytes"],
                    "comm_nccl_us": sum(p["comm_nccl_us"] for p in per),
                    "comm_custom_us": sum(p["comm_custom_us"] for p in per)}
            info["prefill"] = [annotate(steps.prefill(st, args.prefill, args.chunk), comm)]
    finally:
        runner.release_graphs()
        ranks.stop()
    return info


def eagle_row(st: steps.Stage, b: int) -> dict:
    """full_depth_steps.eagle, but the roofline's distinct experts come from the formula: that function
    counts them on an eager step with the leader's graphs set aside, while the followers would replay
    theirs (each rank picks graph or eager on its own), so under TP every step here runs as the worker
    runs it."""
    c, (s, k, n) = st.runner.config, st.spec

    def distinct(tokens: int) -> float:
        return expected_distinct(c.n_routed_experts, c.num_experts_per_tok, tokens)

    moe = c.num_hidden_layers - c.first_k_dense_replace
    calls = ([("model.layers", distinct(b * n))] * moe + [("mtp.decoder", distinct(b * k))] * (s - 1)
             + [("mtp.decoder", distinct(b * (s + 1)))])
    reqs, reset = steps._requests(st, b)
    t_plain = steps.isolated_us(st, lambda: st.plain.step(reqs), reset)
    t_eagle = steps.isolated_us(st, lambda: st.eagle.step(reqs), reset)
    row = {"batch": b, "plain_step_us": t_plain, "eagle_step_us": t_eagle, "eagle_over_plain": t_eagle / t_plain,
           "plain_tok_s": b / t_plain * 1e6, "eagle_tok_s": {a: b * a / t_eagle * 1e6 for a in range(1, s + 2)}}
    row.update(st.floors(steps.eagle_parts(st, b, calls)))
    row["measured_us"] = t_eagle
    return row


def _eagle_comm(b: int, spec: tuple[int, ...], layers: int, h: int, v: int, tp: int) -> dict:
    s, k, n = spec
    parts = [comm_us(b * n, 2 * layers, b * n, h, v, tp)]
    parts += [comm_us(b * k, 2, b * k, h, v, tp) for _ in range(s - 1)]
    parts.append(comm_us(b * (s + 1), 2, b, h, v, tp))
    return {"allreduces": sum(p["allreduces"] for p in parts), "allreduce_bytes": parts[0]["allreduce_bytes"],
            "comm_nccl_us": sum(p["comm_nccl_us"] for p in parts),
            "comm_custom_us": sum(p["comm_custom_us"] for p in parts)}


def markdown(info: dict) -> str:
    def fmt(x: object) -> str:
        return f"{x:.3g}" if isinstance(x, float) else str(x)

    def table(rows: list[dict], cols: list[str]) -> list[str]:
        out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        return out + ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]

    title = (f"# TP {info['tp']} step: {info['model']} {info['layers']} layers {info['dtype']}, {info['backend']} on "
             f"{', '.join(info['devices'])}")
    facts = (f"ranks up (dummy weights) in {info['start_s']:.1f} s; graphs captured in {info.get('capture_s', 0):.1f} s; "
             f"rank 0 weights {info.get('weights_gb_rank0', 0):.1f} GB; context {info['context']}; "
             f"ceilings {info.get('ceilings', '-')}")
    legend = ("per_op_us: rank's roofline floor; comm: predicted all-reduces + logits gather (NCCL / one-shot); "
              "of_floor_plus_comm = measured / (floor + one-shot comm)")
    head = [title, "", facts, "", legend, ""]
    common = ["per_op_us", "allreduces", "comm_nccl_us", "comm_custom_us", "floor_plus_custom_us", "of_floor_plus_comm"]
    text = head + ["## Decode step (graph replay)", ""]
    text += table(info["decode"], ["batch", "graph_us", "back_to_back_us", "tok_s", *common])
    if info.get("eagle"):
        text += ["", f"## EAGLE {info['spec']} step", ""]
        text += table(info["eagle"], ["batch", "plain_step_us", "eagle_step_us", "eagle_over_plain", *common])
    if info.get("prefill"):
        text += ["", "## Prefill", ""]
        text += table(info["prefill"], ["tokens", "chunks", "measured_us", "with_draft_us", "tok_s", *common])
    return "\n".join(text) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="bench_tp_step_") as tmp:
        info = run(args, Path(tmp))
    text = markdown(info)
    print(text, flush=True)
    name = f"bench_tp_step_{args.model}_tp{args.tp}_{args.dtype}{'_tiny' if args.tiny else ''}"
    measure.write_out(name + ".md", text)
    measure.write_out(name + ".json", json.dumps(info, indent=1, default=str))
    out = measure.out_dir()
    if out is not None:  # one file per run
        with open(out / "bench_tp_step.md", "a") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
