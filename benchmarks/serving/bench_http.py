"""What the OpenAI HTTP surface costs next to gRPC: the same requests through both, on one cluster.

    python3 -m benchmarks.serving.bench_http [--device cpu|cuda:0] [--concurrency 1,64] [--tokens 64]

Starts gateway + prefill + decode on the tiny model (`start_cluster`, real processes and KV
transport) and sends identical greedy completions of random token-id prompts through gRPC
(`Generate`) and HTTP (`/v1/completions`, the same pipeline), surface after surface, twice each,
at every concurrency:

- per request: one-token non-stream requests; client latency (median, p99) and the gateway
  process's CPU time per request (utime + stime from /proc, over the round);
- per streamed token: `--tokens`-token streams; inter-token latency seen by the client (median of
  each stream's (last - first) / (n - 1)) and the gateway's CPU time per streamed token.

The clients are asyncio (grpc.aio, aiohttp reading raw SSE) in this process. On a small machine
the clients, the gateway and the workers share the cores, so latencies carry the model's time and
the contention; the gateway CPU columns are the surface's own cost. With OUT set, writes
$OUT/bench_http.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
from pathlib import Path

import aiohttp
import grpc

from benchmarks import measure
from common.tools.launch import start_cluster
from common.tools.tiny_model import make_tiny_model
from protos import gateway_pb2, gateway_pb2_grpc

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


async def grpc_call(stub, ids: list[int], tokens: int, stream: bool) -> list[float]:
    """Arrival times of the tokens (one stamp per token)."""
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids), stream=stream)
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = tokens, 0.0, True
    stamps = []
    async for r in stub.Generate(req, timeout=600):
        stamps += [time.perf_counter()] * len(r.token_ids)
    return stamps


async def http_call(session: aiohttp.ClientSession, url: str, ids: list[int], tokens: int,
                    stream: bool) -> list[float]:
    body = {"model": "tiny", "prompt": ids, "max_tokens": tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream, "logprobs": 0}
    stamps = []
    async with session.post(url, json=body) as r:
        assert r.status == 200, await r.text()
        if not stream:
            data = await r.json()
            return [time.perf_counter()] * len(data["choices"][0]["logprobs"]["tokens"])
        async for line in r.content:
            if line.startswith(b"data: {"):
                lp = json.loads(line[6:])["choices"][0]["logprobs"]
                stamps += [time.perf_counter()] * (len(lp["tokens"]) if lp else 0)
    return stamps


async def measure_round(call, prompts: list[list[int]], tokens: int, stream: bool, pid: int, conc: int) -> dict:
    """All prompts, at most `conc` in flight at once."""
    cpu0 = cpu_seconds(pid)
    starts = [0.0] * len(prompts)
    slots = asyncio.Semaphore(conc)

    async def one(i: int) -> list[float]:
        async with slots:
            starts[i] = time.perf_counter()
            return await call(prompts[i], tokens, stream)

    results = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    cpu = cpu_seconds(pid) - cpu0
    latency = [s[-1] - t0 for s, t0 in zip(results, starts)]
    itl = [(s[-1] - s[0]) / (len(s) - 1) for s in results if len(s) > 1]
    n_tokens = sum(len(s) for s in results)
    return {"latency": latency, "itl": itl, "cpu": cpu, "requests": len(prompts), "tokens": n_tokens}


def _ms(xs: list[float], q: float = 0.5) -> str:
    if not xs:
        return "-"
    xs = sorted(xs)
    return f"{xs[min(len(xs) - 1, int(q * len(xs)))] * 1e3:.2f}"


async def run(args: argparse.Namespace, cluster) -> list[str]:
    rng = random.Random(0)
    prompt = lambda: [rng.randrange(800) for _ in range(args.prompt)]
    pid = cluster.procs["gateway"].pid
    url = f"http://127.0.0.1:{cluster.http_port}/v1/completions"
    rows = []
    limit = aiohttp.TCPConnector(limit=0)
    async with grpc.aio.insecure_channel(cluster.gateway_address) as ch, \
            aiohttp.ClientSession(connector=limit) as session:
        stub = gateway_pb2_grpc.GatewayStub(ch)
        calls = {"gRPC": lambda ids, n, s: grpc_call(stub, ids, n, s),
                 "HTTP": lambda ids, n, s: http_call(session, url, ids, n, s)}
        for call in calls.values():  # warm-up: pairing, first forwards
            await measure_round(call, [prompt() for _ in range(4)], 4, True, pid, 4)
        for conc in args.concurrency:
            for kind, tokens, stream in (("request", 1, False), ("stream", args.tokens, True)):
                merged: dict[str, dict] = {}
                for _ in range(args.repeats):
                    for name, call in calls.items():  # surface after surface, same sizes
                        prompts = [prompt() for _ in range(max(conc, args.requests))]
                        r = await measure_round(call, prompts, tokens, stream, pid, conc)
                        m = merged.setdefault(name, {"latency": [], "itl": [], "cpu": 0.0, "requests": 0,
                                                     "tokens": 0})
                        for k in ("latency", "itl"):
                            m[k] += r[k]
                        for k in ("cpu", "requests", "tokens"):
                            m[k] += r[k]
                for name, m in merged.items():
                    if kind == "request":
                        row = (f"| {name} | {conc} | 1-token request | {m['requests']} | {_ms(m['latency'])} | "
                               f"{_ms(m['latency'], 0.99)} | {m['cpu'] / m['requests'] * 1e6:.0f} µs/request |")
                    else:
                        row = (f"| {name} | {conc} | {args.tokens}-token stream | {m['requests']} | "
                               f"ITL {_ms(m['itl'])} | ITL {_ms(m['itl'], 0.99)} | "
                               f"{m['cpu'] / m['tokens'] * 1e6:.0f} µs/token |")
                    print(row, flush=True)
                    rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="worker device (cpu, cuda:0)")
    ap.add_argument("--concurrency", default="1,64", help="concurrent requests, comma-separated")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per streamed request")
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens")
    ap.add_argument("--requests", type=int, default=64, help="requests per round (at least the concurrency)")
    ap.add_argument("--repeats", type=int, default=2, help="rounds per surface, alternating")
    ap.add_argument("--log-dir", default=None, help="process logs (default: a temporary directory)")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    work = Path(tempfile.mkdtemp(prefix="bench_http_"))
    model = make_tiny_model(work / "model", template="glm45")
    cluster = start_cluster(model, prefill=1, decode=1, device=args.device,
                            extra_decode_args=["--max-running-requests", str(max(args.concurrency))],
                            log_dir=Path(args.log_dir or work / "logs"))
    try:
        cluster.wait_ready(300)
        head = ["| surface | concurrency | what | requests | p50 (ms) | p99 (ms) | gateway CPU |",
                "|---|---|---|---|---|---|---|"]
        print("\n".join(head), flush=True)
        rows = asyncio.run(run(args, cluster))
        measure.write_out("bench_http.md", "\n".join(
            [f"device {args.device}, {os.cpu_count()} CPUs, prompt {args.prompt} tokens, {time.strftime('%F')}",
             "", *head, *rows, ""]))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
