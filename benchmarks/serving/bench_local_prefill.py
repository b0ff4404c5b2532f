"""The decode worker's local prefill against the prefill leg, for a prompt whose prefix it holds.

    python3 -m benchmarks.serving.bench_local_prefill [--device cuda:0] [--prefix 4096]
        [--suffix 16,32,64,128,256,512,1024] [--background 32] [--probes 5] [--tiny]

When the decode worker chosen for a prompt already holds all of it but a short suffix, it can
compute the suffix itself inside its running batch (gateway `--local-prefill-max-tokens`, decode
worker `--decode-local-prefill-tokens`) instead of waiting for a prefill worker to compute it and
send its KV. That saves the prefill leg's round trip and transfer, and costs the batch a longer step.
This measures both sides of that trade, to set the threshold by.

One cluster at a time (gateway + prefill + decode on the one device, prefix caches on): "local" with
both thresholds at --local-max, "remote" with both at 0 (every suffix goes through the prefill
worker). On each, --background greedy streams decode all along (requests of --stream-tokens tokens,
one after another), and a probe prompt is sent for each suffix length N, --probes times: the same
--prefix-token prefix (sent once before, so both workers hold it) + N fresh tokens, max_tokens 2.
Per N and cluster: median time to the probe's first token, its cached_tokens, how many probes the
decode worker prefilled itself (its local-prefill counter), and the longest gap between two tokens
of a background stream that overlaps the probe (median over probes) against the streams' median
gap outside the probes: what the running batch pays for the probe. With OUT set, writes
$OUT/bench_local_prefill.md.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import torch

from benchmarks import measure
from benchmarks.serving.bench_e2e import serving_model
from benchmarks.serving.bench_prefix_cache import ttft
from common.tools.launch import free_ports, start_cluster
from protos import gateway_pb2, gateway_pb2_grpc

LOCAL_COUNTER = "glmserve_decode_prefix_cache_local_prefills_total"


def _request(ids: list[int], max_tokens: int) -> gateway_pb2.GenerateRequest:
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = max_tokens, 0.0, True
    return req


class Side:
    """One cluster, its background streams and its probes."""

    def __init__(self, args: argparse.Namespace, model: Path, local: bool) -> None:
        self.args, self.name = args, "local" if local else "remote"
        limit = str(args.local_max if local else 0)
        self.metrics_port = free_ports(1)[0]
        self.cluster = start_cluster(
            model, prefill=1, decode=1,
            extra_worker_args=["--mem-fraction-static", "0.4"] if args.device.startswith("cuda") else [],
            extra_prefill_args=["--device", args.device, "--chunked-prefill-size", "8192"],
            extra_decode_args=["--device", args.device, "--decode-local-prefill-tokens", limit,
                               "--max-running-requests", str(args.background + 8),
                               "--metrics-port", str(self.metrics_port)],
            extra_gateway_args=["--local-prefill-max-tokens", limit],
            log_dir=Path(args.log_dir) / self.name)
        self.stamps: list[list[float]] = []  # one list per background request: its tokens' arrival times
        self.stop = threading.Event()
        self.stub: gateway_pb2_grpc.GatewayStub | None = None

    def local_prefills(self) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).read().decode()
        m = re.search(rf"^{LOCAL_COUNTER} ([0-9.e+-]+)$", text, re.MULTILINE)
        return float(m.group(1)) if m else 0.0

    def background(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        while not self.stop.is_set():
            ids = torch.randint(0, self.args.vocab, (self.args.stream_prompt,), generator=gen).tolist()
            stamps: list[float] = []
            self.stamps.append(stamps)
            call = self.stub.Generate(_request(ids, self.args.stream_tokens), timeout=600)
            for r in call:
                if r.token_ids:
                    stamps.append(time.perf_counter())
                if self.stop.is_set():
                    call.cancel()
                    break

    def probe(self, ids: list[int]) -> tuple[float, float, int]:
        """(send time, first-token time, cached tokens) of one 2-token request."""
        sent = time.perf_counter()
        seconds, cached = ttft(self.stub, ids)
        return sent, sent + seconds, cached

    def run(self, gen: torch.Generator) -> tuple[dict[int, dict[str, float]], float]:
        """Per suffix length: median TTFT, cached tokens, probes prefilled on decode, the batch's longest
        gap during a probe (ms); and the batch's median gap outside the probes (ms)."""
        args = self.args
        self.cluster.wait_ready(300)
        self.stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(self.cluster.gateway_address))

        def fresh(n: int) -> list[int]:
            return torch.randint(0, args.vocab, (n,), generator=gen).tolist()

        prefix = fresh(args.prefix)
        self.probe(prefix)  # both workers now hold the prefix; the kernels of these shapes are compiled
        for n in args.suffix:  # unmeasured: every probe shape once, before the batch runs
            self.probe(prefix + fresh(n))
        threads = [threading.Thread(target=self.background, args=(i,), daemon=True) for i in range(args.background)]
        for t in threads:
            t.start()
        time.sleep(args.settle_s)  # the batch reaches its size
        windows: list[tuple[int, float, float, int]] = []
        out: dict[int, dict[str, float]] = {}
        try:
            for n in args.suffix:
                before = self.local_prefills()
                ttfts = []
                for _ in range(args.probes):
                    sent, first, cached = self.probe(prefix + fresh(n))
                    windows.append((n, sent, first, cached))
                    ttfts.append(first - sent)
                    time.sleep(args.gap_s)  # the batch settles between probes
                out[n] = {"ttft_ms": statistics.median(ttfts) * 1e3,
                          "cached": statistics.median(w[3] for w in windows if w[0] == n),
                          "local": self.local_prefills() - before}
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=60)
            self.cluster.stop()
        gaps = [(a, b) for stamps in self.stamps for a, b in itertools.pairwise(stamps)]
        inside = [False] * len(gaps)
        for n in args.suffix:
            worst = []
            for m, sent, first, _ in windows:
                if m != n:
                    continue
                hit = [i for i, (a, b) in enumerate(gaps) if b > sent and a < first]
                for i in hit:
                    inside[i] = True
                worst.append(max((gaps[i][1] - gaps[i][0] for i in hit), default=0.0))
            out[n]["max_gap_ms"] = statistics.median(worst) * 1e3
        calm = [b - a for (a, b), hit in zip(gaps, inside) if not hit]
        return out, statistics.median(calm) * 1e3 if calm else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0", help="device of both workers")
    ap.add_argument("--prefix", type=int, default=4096, help="tokens of the prefix both workers hold")
    ap.add_argument("--suffix", default="16,32,64,128,256,512,1024", help="uncached suffix lengths")
    ap.add_argument("--local-max", type=int, default=1024, help="the local cluster's thresholds")
    ap.add_argument("--background", type=int, default=32, help="streams decoding all along")
    ap.add_argument("--stream-prompt", type=int, default=512, help="each background request's prompt")
    ap.add_argument("--stream-tokens", type=int, default=256, help="each background request's output")
    ap.add_argument("--probes", type=int, default=5, help="probes per suffix length (the median is kept)")
    ap.add_argument("--settle-s", type=float, default=3.0, help="seconds for the batch to fill before probing")
    ap.add_argument("--gap-s", type=float, default=0.3, help="seconds between probes")
    ap.add_argument("--tiny", action="store_true", help="the tiny 3-layer model (CPU smoke run)")
    ap.add_argument("--log-dir", default=os.path.join(tempfile.gettempdir(), "glmserve_bench_local_prefill"))
    args = ap.parse_args()
    args.suffix = [int(v) for v in args.suffix.split(",")]
    args.vocab = 700 if args.tiny else 800
    model = serving_model(args.tiny)
    results, calm = {}, {}
    for local in (True, False):
        side = Side(args, model, local)
        results[side.name], calm[side.name] = side.run(torch.Generator().manual_seed(0))
    rows = [(f"prefix {args.prefix} tokens held by both workers; {args.background} background streams of "
             f"{args.stream_tokens} tokens; local cluster thresholds {args.local_max}; medians of {args.probes} "
             f"probes; the batch's median gap outside the probes {calm['local']:.1f} ms (local cluster) / "
             f"{calm['remote']:.1f} ms (remote)"), "",
            ("| suffix | TTFT local (ms) | TTFT remote (ms) | local / remote | prefilled on decode (local) | "
             "cached tokens, local / remote | batch's longest gap during the probe, local / remote (ms) |"),
            "|---|---|---|---|---|---|---|"]
    for n in args.suffix:
        lo, re_ = results["local"][n], results["remote"][n]
        rows.append(f"| {n} | {lo['ttft_ms']:.1f} | {re_['ttft_ms']:.1f} | {lo['ttft_ms'] / re_['ttft_ms']:.2f}x | "
                    f"{lo['local']:.0f} of {args.probes} | {lo['cached']:.0f} / {re_['cached']:.0f} | "
                    f"{lo['max_gap_ms']:.1f} / {re_['max_gap_ms']:.1f} |")
    text = "\n".join(rows)
    measure.publish("bench_local_prefill.md", args.device, text)


if __name__ == "__main__":
    main()
