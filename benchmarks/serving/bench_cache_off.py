"""Serving throughput with `--disable-radix-cache` against a revision from before the prefix caches.

    git worktree add /tmp/glmserve_base <revision>
    python3 -m benchmarks.serving.bench_cache_off --baseline /tmp/glmserve_base [--tiny --device cpu]

Starts one cluster (gateway + prefill + decode worker) from this checkout with every cache off and
one from the source tree at `--baseline`, each in a host process of its own whose Python imports
that tree, and drives both from here with the same client: `--concurrency` streams of `--prompt`
fresh random token ids, `--max-tokens` tokens each (greedy, EOS ignored): one unmeasured round, then
`--rounds` measured ones, alternating which cluster goes first, each cluster started afresh per round
and warmed by one unmeasured pass per level. Reports output
tokens a second (the round's tokens over its wall time) and mean TTFT, medians over the rounds, and
the ratio this checkout / baseline, which the prefix-cache design holds to 1 +- 0.02 (a disabled
cache must cost nothing). The two clusters never run at once. With OUT set, writes
$OUT/bench_cache_off.md.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc

from benchmarks import measure
from benchmarks.serving.bench_e2e import serving_model
from protos import gateway_pb2, gateway_pb2_grpc

REPO = Path(__file__).resolve().parents[2]

# run by `python -c` in the host process, with the tree under test first on sys.path: start its
# cluster, print the gateway address, serve until stdin closes
HOST = """
import json, sys
from common.tools.launch import start_cluster
kw = json.loads(sys.argv[1])
cluster = start_cluster(kw.pop("model"), **kw)
try:
    cluster.wait_ready(600)
    print("ADDRESS " + cluster.gateway_address, flush=True)
    sys.stdin.read()
finally:
    cluster.stop()
"""


class Host:
    """One cluster started from the source tree `tree` (its own Python process importing that tree)."""

    def __init__(self, tree: Path, model: Path, worker_args: list[str], gateway_args: list[str], device: str,
                 log_dir: Path) -> None:
        import json

        kw = {"model": str(model), "prefill": 1, "decode": 1, "extra_worker_args": worker_args,
              "extra_prefill_args": ["--device", device, "--chunked-prefill-size", "8192"],
              "extra_decode_args": ["--device", device, "--max-running-requests", "64"],
              "extra_gateway_args": gateway_args, "log_dir": str(log_dir)}
        env = dict(os.environ, PYTHONPATH=str(tree))
        self.proc = subprocess.Popen([sys.executable, "-c", HOST, json.dumps(kw)], cwd=tree, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("ADDRESS "):
                self.address = line.split()[1]
                break
        else:
            raise RuntimeError(f"the cluster from {tree} did not start (logs in {log_dir})")
        # whatever the host prints later must not fill the pipe and stall it
        threading.Thread(target=self.proc.stdout.read, daemon=True).start()
        self.stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(self.address))

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(60)


def one(stub: gateway_pb2_grpc.GatewayStub, ids: list[int], max_tokens: int) -> tuple[float, int]:
    """(TTFT s, tokens) of one greedy stream."""
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = max_tokens, 0.0, True
    t0, ttft, n = time.perf_counter(), 0.0, 0
    for r in stub.Generate(req, timeout=600):
        if r.token_ids and not n:
            ttft = time.perf_counter() - t0
        n += len(r.token_ids)
    return ttft, n


def round_of(host: Host, conc: int, prompt: int, max_tokens: int, vocab: int, rng: random.Random) -> tuple[float, float]:
    """(output tokens/s, mean TTFT ms) of `conc` concurrent streams of fresh prompts."""
    prompts = [[rng.randrange(8, vocab) for _ in range(prompt)] for _ in range(conc)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(conc) as pool:
        done = list(pool.map(lambda ids: one(host.stub, ids, max_tokens), prompts))
    wall = time.perf_counter() - t0
    return sum(n for _, n in done) / wall, 1000 * statistics.mean(t for t, _ in done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", type=Path, required=True, help="source tree of the revision to compare with")
    ap.add_argument("--device", default="cuda:0", help="device of both workers")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens a stream (shorter rounds vary more)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="the tiny 3-layer model (CPU)")
    ap.add_argument("--log-dir", default=os.path.join(tempfile.gettempdir(), "glmserve_bench_cache_off"))
    args = ap.parse_args()
    if not (args.baseline / "common" / "tools" / "launch.py").exists():
        sys.exit(f"--baseline {args.baseline}: not a glmserve source tree (no common/tools/launch.py)")
    levels = [int(c) for c in args.concurrency.split(",")]
    model = serving_model(args.tiny)
    gpu = args.device.startswith("cuda")
    shared = ["--mem-fraction-static", "0.4"] if gpu else []  # prefill and decode on one GPU
    rng = random.Random(0)
    results: dict[str, dict[int, list[tuple[float, float]]]] = {"off": {c: [] for c in levels},
                                                                  "base": {c: [] for c in levels}}
    for r in range(args.rounds + 1):
        order = ("off", "base") if r % 2 else ("base", "off")
        for side in order:  # one cluster at a time: each round starts both afresh, in alternating order
            tree, off = (REPO, ["--disable-radix-cache"]) if side == "off" else (args.baseline, [])
            host = Host(tree, model, shared + off, off, args.device, Path(args.log_dir) / f"{side}{r}")
            try:
                for conc in levels:
                    round_of(host, conc, args.prompt, args.max_tokens, 500, rng)  # unmeasured: warm-up
                    got = round_of(host, conc, args.prompt, args.max_tokens, 500, rng)
                    if r:
                        results[side][conc].append(got)
                    print(f"round {r} {side:4s} c={conc}: {got[0]:.1f} tok/s, TTFT {got[1]:.1f} ms", flush=True)
            finally:
                host.close()
    rows = ["| concurrency | output tok/s, cache off | baseline | off / baseline | mean TTFT ms, off / baseline |",
            "|---|---|---|---|---|"]
    for conc in levels:
        tput = {s: statistics.median(t for t, _ in results[s][conc]) for s in results}
        ttft = {s: statistics.median(f for _, f in results[s][conc]) for s in results}
        rows.append(f"| {conc} | {tput['off']:.1f} | {tput['base']:.1f} | {tput['off'] / tput['base']:.3f} | "
                    f"{ttft['off']:.1f} / {ttft['base']:.1f} |")
    head = f"prompt {args.prompt} tokens, {args.max_tokens} out; medians of {args.rounds} rounds; baseline tree {args.baseline}"
    measure.publish("bench_cache_off.md", args.device, head + "\n\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
