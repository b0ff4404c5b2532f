"""End-to-end serving numbers: gateway + prefill + decode processes, real gRPC, real KV transport.

    python3 -m benchmarks.serving.bench_e2e [--device cuda:0] [--decode-device cuda:0] [--concurrency 1,8,32]
                                   [--overlap on|off|both] [--no-spec]

Writes a model directory with GLM-4.5-Air layer widths (H 4096, 96/8 heads of 128 -> the same KV
bytes per token and layer as Air; 4 layers; 16 routed experts of I_e 1408 top-8; the tiny
tokenizer's vocabulary) and the MTP layer, starts the three processes (both workers on one GPU:
the KV moves over CUDA IPC; on two GPUs: NCCL), then measures per concurrency level: TTFT (client side), inter-token latency, output
tokens/s, and the KV transfer rate the decode worker recorded (bytes / first-to-last-chunk time,
which includes waiting for the prefill's compute when layer groups stream). `--constraints none,json`
measures every level also with each request under a JSON schema (an array of at least 16 objects
`{"id": integer, "name": string}`, so no answer can end inside `--max-tokens` and every output token
is sampled under the grammar's mask), in the same processes, side by side. The plain decode runs
with the overlapped schedule (the worker's default); `--overlap off` passes the decode worker
`--disable-overlap-schedule`, `--overlap both` measures plain decode both ways. With OUT set, writes
$OUT/bench_e2e.md.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch

from benchmarks import measure
from common.tools.launch import free_port, start_cluster
from common.tools.tiny_model import make_tiny_model
from protos import gateway_pb2, gateway_pb2_grpc

AIR_LAYERS = {"num_layers": 4, "hidden_size": 4096, "intermediate_size": 10944, "moe_intermediate_size": 1408,
              "num_attention_heads": 96, "num_key_value_heads": 8, "head_dim": 128, "n_routed_experts": 16,
              "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "use_qk_norm": False,
              "routed_scaling_factor": 1.0, "max_position_embeddings": 40960}


def serving_model(tiny: bool, *, layers: int = AIR_LAYERS["num_layers"], template: str = "glm45",
                  model_dir: str | None = None, **overrides: Any) -> Path:
    """The model directory a serving benchmark starts its workers on, written once per shape under the
    temp dir (or at `model_dir`): the tiny 3-layer model (`tiny`), else AIR_LAYERS in bf16 with `layers`
    layers (other than 4: config only, for `--load-format dummy`); `overrides` replace config fields."""
    dummy = not tiny and layers != AIR_LAYERS["num_layers"]
    if model_dir:
        path = Path(model_dir)
    else:
        name = ["tiny_model" if tiny else f"air_layers{layers if dummy else ''}"]
        name += ([template] if template != "glm45" else []) + [f"{k}{v}" for k, v in sorted(overrides.items())]
        path = Path(tempfile.gettempdir()) / ("glmserve_" + "_".join(name))
    if not (path / "config.json").exists():
        shape = {} if tiny else dict(AIR_LAYERS, num_layers=layers, weight_dtype=torch.bfloat16, weights=not dummy)
        make_tiny_model(path, template=template, **dict(shape, **overrides))
    return path


# the schema of `--constraints json`: no answer that satisfies it fits in fewer than 16 * 8 tokens
JSON_SCHEMA = json.dumps({"type": "array", "minItems": 16, "items": {
    "type": "object", "required": ["id", "name"],
    "properties": {"id": {"type": "integer"}, "name": {"type": "string"}}}})


def stream(stub, ids: list[int], max_tokens: int, constraint: str = "none") -> tuple[float, list[float], list[int]]:
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = max_tokens, 0.0, True
    if constraint == "json":
        req.sampling.json_schema = JSON_SCHEMA
    t0 = time.perf_counter()
    stamps, toks = [], []
    for r in stub.Generate(req, timeout=600):
        if r.token_ids:
            stamps += [time.perf_counter() - t0] * len(r.token_ids)
            toks += list(r.token_ids)
    return t0, stamps, toks


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for name in ("glmserve_kv_transfer_bytes_total", "glmserve_kv_transfer_seconds_sum",
                 "glmserve_kv_transfer_seconds_count"):
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def run(args: argparse.Namespace, model: Path, spec: list[str], overlap: bool = True) -> list[str]:
    mport = free_port()
    shared = args.device == args.decode_device  # two processes on one GPU split its memory
    is_spec = "--speculative-algorithm" in spec
    spec = spec + (["--mem-fraction-static", "0.4"] if shared else [])
    name = "spec" if is_spec else "plain" if overlap else "plain_sync"
    cluster = start_cluster(model, prefill=1, decode=1, extra_worker_args=spec,
                            extra_prefill_args=["--device", args.device, "--chunked-prefill-size", "8192"],
                            extra_decode_args=["--device", args.decode_device, "--metrics-port", str(mport),
                                               "--max-running-requests", "64",
                                               *([] if overlap else ["--disable-overlap-schedule"])],
                            log_dir=Path(args.log_dir) / name)
    rows = []
    try:
        cluster.wait_ready(300)
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(cluster.gateway_address))
        gen = torch.Generator().manual_seed(0)
        prompt = lambda: torch.randint(0, 800, (args.prompt,), generator=gen).tolist()
        stream(stub, prompt(), 4)  # warm-up: pairing, kernels
        if "json" in args.constraints:
            stream(stub, prompt(), 4, "json")  # the schema's compile (cached from here on)
        for conc in args.concurrency:
            with ThreadPoolExecutor(conc) as pool:  # unmeasured round: kernels for these shapes compile here
                list(pool.map(lambda p: stream(stub, p, 8), [prompt() for _ in range(conc)]))
            for constraint in args.constraints:
                before = scrape(mport)
                prompts = [prompt() for _ in range(conc)]
                t_start = time.perf_counter()
                with ThreadPoolExecutor(conc) as pool:
                    res = list(pool.map(lambda p, c=constraint: stream(stub, p, args.max_tokens, c), prompts))
                wall = time.perf_counter() - t_start
                after = scrape(mport)
                ttft = [s[0] for _, s, _ in res]
                itl = [(s[-1] - s[0]) / (len(s) - 1) for _, s, _ in res if len(s) > 1]
                tokens = sum(len(t) for _, _, t in res)
                nbytes = after["glmserve_kv_transfer_bytes_total"] - before["glmserve_kv_transfer_bytes_total"]
                secs = after["glmserve_kv_transfer_seconds_sum"] - before["glmserve_kv_transfer_seconds_sum"]
                schedule = "n/a" if is_spec else "on" if overlap else "off"
                row = (f"| {'EAGLE 3,1,4' if is_spec else 'off'} | {schedule} | {constraint} | {conc} | {args.prompt} | "
                       f"{statistics.median(ttft) * 1e3:.1f} | {max(ttft) * 1e3:.1f} | "
                       f"{statistics.median(itl) * 1e3:.2f} | {tokens / wall:.0f} | "
                       f"{nbytes / 2**20 / max(1, conc):.1f} | {nbytes / secs / 1e9 if secs else float('nan'):.1f} |")
                print(row, flush=True)
                rows.append(row)
    finally:
        cluster.stop()
        out_dir = measure.out_dir()
        if out_dir is not None:  # one file of every process's log tail, for post-mortems
            with open(out_dir / "e2e_workers.log", "a") as out:
                out.writelines(f"===== {f}\n{f.read_text()[-6000:]}\n"
                               for f in sorted((Path(args.log_dir) / name).glob("*.log")))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0", help="prefill worker device")
    ap.add_argument("--decode-device", default=None, help="decode worker device (default: --device)")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--model-dir", default=None, help="reuse a model directory (default: write one)")
    ap.add_argument("--tiny", action="store_true", help="the tiny 3-layer model (a CPU smoke run)")
    ap.add_argument("--log-dir", default=os.path.join(tempfile.gettempdir(), "glmserve_bench_e2e"))
    ap.add_argument("--no-spec", action="store_true")
    ap.add_argument("--constraints", default="none",
                    help="comma-separated: none (free output), json (every token under a JSON schema's mask)")
    ap.add_argument("--overlap", default="on", choices=("on", "off", "both"),
                    help="plain decode with the overlapped schedule (on), with --disable-overlap-schedule (off), "
                         "or both, one after the other")
    args = ap.parse_args()
    args.decode_device = args.decode_device or args.device
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.constraints = args.constraints.split(",")
    if not set(args.constraints) <= {"none", "json"}:
        ap.error(f"--constraints: {args.constraints} (each of none, json)")
    default_dir = "glmserve_tiny_model" if args.tiny else "glmserve_air_layers"
    model = Path(args.model_dir) if args.model_dir else Path(tempfile.gettempdir()) / default_dir
    if not (model / "config.json").exists():
        t0 = time.time()
        make_tiny_model(model, weight_dtype=torch.bfloat16, **({} if args.tiny else AIR_LAYERS))
        print(f"wrote the model to {model} in {time.time() - t0:.0f}s", flush=True)
    header = [("| spec | overlap schedule | constraint | concurrency | prompt | TTFT p50 (ms) | TTFT max (ms) | ITL p50 (ms) | "
               "output tok/s | KV MiB/request | KV transfer GB/s (decode side) |"),
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    rows = []
    for overlap in {"on": (True,), "off": (False,), "both": (True, False)}[args.overlap]:
        rows += run(args, model, [], overlap)
    if not args.no_spec:
        rows += run(args, model, ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3",
                                  "--speculative-eagle-topk", "1", "--speculative-num-draft-tokens", "4"])
    text = "\n".join(header + rows)
    print(text)
    measure.write_out("bench_e2e.md", f"devices: prefill {args.device}, decode {args.decode_device}; "
                      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}\n\n{text}\n")


if __name__ == "__main__":
    main()
