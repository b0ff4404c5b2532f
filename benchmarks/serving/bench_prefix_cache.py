"""Prefix-cache serving numbers: cold against warm TTFT through gateway + prefill + decode processes.

    python3 -m benchmarks.serving.bench_prefix_cache [--device cuda:0] [--concurrency 1,16] [--prompt 8192]
                                                   [--last-page-prompt 10240] [--spec] [--tiny]
    python3 -m benchmarks.serving.bench_prefix_cache --routing 4 [--sessions 16] [--turns 4] [--routing-keys] [--tiny]

On the GLM-4.5-Air-layer model of bench_e2e (4 layers + MTP; `--layers N`: N such layers with dummy
weights, for a forward of a depth where the per-request fixed costs weigh as they do in serving;
`--tiny`: the 3-layer tiny model, a CPU smoke run) it starts one cluster with every prefix cache on
(prefill, decode, the gateway's index) and one with `--disable-radix-cache` on all three processes,
both at once, which take turns on the same prompts, and measures per concurrency level, each the
median of `--rounds` rounds that each follow an unmeasured round of the same kind:

- cold: fresh prompts of `--prompt` tokens (nothing cached), on both clusters: the cache's overhead
  on a miss (target: within 2 % of the cache-off TTFT);
- warm: each session's next prompt keeps `--warm-fraction` (default 0.92) of its cold prompt and
  ends in new tokens, against the same prompts with the caches off (target: TTFT <= 0.35x at 8K,
  concurrency 16);
- last page: a `--last-page-prompt`-token prompt sent again, so all but its last page is cached
  (target: TTFT <= 0.2x the caches-off TTFT; a fresh prompt each of `--rounds` pairs, the median);

with the `cached_tokens` the gateway reported, where the hits came from (the workers' counters:
prefill-side and decode-side cached tokens, prompts the decode worker finished itself, KV bytes
sent), and the host cost of matching and keying one prompt of `--prompt` tokens in the index
(target: <= 1 % of that prompt's prefill forward; `--prefill-ms` names a full-depth model's), and
what a cold prompt's pages cost one worker's engine thread with the cache on and off (a full pool
that evicts, a WatchCache stream attached). With OUT set, writes $OUT/bench_prefix_cache.md.

`--routing N` instead compares the gateway's routing on N prefill workers (prefix caches on) and one
decode worker: `--sessions` conversations run at once, each `--turns` turns long, each turn's prompt
the previous prompt + its `--output` tokens + `--turn-tokens` new ones (SGLang's multi-turn
shape), after a pause of `--think-ms` on average (a user reading, a tool running), first with cache-aware routing, then with the gateway's `--disable-radix-cache` (least
loaded), and with `--routing-keys` also cache-aware with each session sending its routing key
(`prompt_cache_key`). `--prefill-pages` bounds each prefill worker's pool below the sessions' working set
(the regime of many sessions per worker: least-loaded routing spreads every session over all pools,
cache-aware routing keeps one copy of each). The one decode worker's own cache is off unless `--decode-cache`: it holds every session, so
with it on both routings hit there and the comparison no longer measures the choice of prefill
worker. Reported per mode: token hit rate (cached / prompt tokens; against the best possible, every
turn finding its whole history), share of requests with a hit, mean TTFT (targets: hit rate >= 3x least loaded, mean TTFT <= 0.5x). Writes
$OUT/bench_prefix_cache_routing.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import torch

from benchmarks import measure
from benchmarks.serving.bench_e2e import AIR_LAYERS, serving_model
from common.kvcache.allocator import PageAllocator
from common.kvcache.prefix_index import PrefixCache
from common.serving.cache_events import CacheEvents
from common.tools.launch import free_ports, start_cluster
from protos import gateway_pb2, gateway_pb2_grpc

PAGE = 16  # the workers' default page size
SPEC = ["--speculative-algorithm", "EAGLE", "--speculative-num-steps", "3", "--speculative-eagle-topk", "1",
        "--speculative-num-draft-tokens", "4"]


def ttft(stub: gateway_pb2_grpc.GatewayStub, ids: list[int]) -> tuple[float, int]:
    """(seconds to the first token, cached_tokens) of one 2-token greedy request."""
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = 2, 0.0, True
    t0 = time.perf_counter()
    first, cached = None, 0
    for r in stub.Generate(req, timeout=600):
        if r.token_ids and first is None:
            first = time.perf_counter() - t0
        if r.HasField("usage"):
            cached = r.usage.cached_tokens
    return first, cached


def batch(stub, prompts: list[list[int]]) -> tuple[float, float]:
    """Median TTFT (ms) of prompts sent together, and their mean cached fraction."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        res = list(pool.map(lambda p: ttft(stub, p), prompts))
    return statistics.median(t for t, _ in res) * 1e3, statistics.mean(c / len(p) for (_, c), p in zip(res, prompts))


def index_cost_ms(n_tokens: int, page_size: int = 16) -> float:
    """Host time of match + allocate + key + release for one n-token prompt, half of it cached."""
    cache = PrefixCache(PageAllocator(2 * n_tokens // page_size + 2), page_size)
    gen = torch.Generator().manual_seed(1)
    base = torch.randint(0, 150000, (n_tokens,), generator=gen).tolist()
    pages = cache.alloc(-(-n_tokens // page_size))
    cache.commit(pages, [], base, n_tokens)
    cache.release(pages)
    times = []
    for i in range(20):
        ids = base[:n_tokens // 2] + torch.randint(0, 150000, (n_tokens - n_tokens // 2,), generator=gen).tolist()
        t0 = time.perf_counter()
        hit = cache.match(ids)
        new = cache.alloc(-(-n_tokens // page_size) - len(hit.pages))
        pages = hit.pages + new
        cache.commit(pages, hit.keys, ids, n_tokens)
        cache.release(pages)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def cold_cost_ms(n_tokens: int, enabled: bool, page_size: int = 16) -> float:
    """Host time one worker's engine thread spends on a cold n-token prompt's pages with its pool
    full of cached pages (so allocation evicts) and a WatchCache subscriber attached: match +
    allocate + key + release, the listener's events included; with `enabled` False the same calls
    on a cache that is off (allocate + release). The difference is what the cache adds to a miss."""
    n_pages = -(-n_tokens // page_size)
    cache = PrefixCache(PageAllocator(4 * n_pages), page_size, enabled=enabled, check_successor=True)
    events = CacheEvents(page_size, "bench")
    cache.subscribe(events.listener)
    loop = asyncio.new_event_loop()
    stream = events.stream()
    assert loop.run_until_complete(anext(stream)).reset  # one WatchCache stream, open (its queue only grows)
    gen = torch.Generator().manual_seed(2)
    times = []
    for i in range(24):
        ids = torch.randint(0, 150000, (n_tokens + 1,), generator=gen).tolist()
        t0 = time.perf_counter()
        hit = cache.match(ids[:-1])
        pages = hit.pages + cache.alloc(n_pages - len(hit.pages))
        cache.commit(pages, hit.keys, ids, n_tokens)
        cache.release(pages)
        times.append(time.perf_counter() - t0)
    loop.run_until_complete(stream.aclose())
    loop.close()
    return statistics.median(times[8:]) * 1e3  # the pool is full of cached pages from the fourth on


SIDE_COUNTERS = {  # (worker, metric) -> short name, scraped around each measured round
    ("prefill", "glmserve_prefix_cache_hit_tokens_total"): "prefill_hit",
    ("decode", "glmserve_decode_prefix_cache_hit_tokens_total"): "decode_hit",
    ("decode", "glmserve_decode_prefix_cache_local_prefills_total"): "local",
    ("decode", "glmserve_kv_transfer_bytes_total"): "kv_bytes",
}


def scrape(ports: dict[str, int]) -> dict[str, float]:
    """The SIDE_COUNTERS of the prefill and decode worker (0 where a counter is absent)."""
    text = {w: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            for w, port in ports.items()}
    out = {}
    for (worker, metric), name in SIDE_COUNTERS.items():
        m = re.search(rf"^{metric} ([0-9.e+-]+)$", text[worker], re.MULTILINE)
        out[name] = float(m.group(1)) if m else 0.0
    return out


def dummy_weights(args: argparse.Namespace) -> list[str]:
    """The workers' load flag for a `--layers` model (its directory holds no weights)."""
    return ["--load-format", "dummy"] if args.layers != AIR_LAYERS["num_layers"] and not args.tiny else []


class Side:
    """One cluster of the comparison: every cache on (prefill, decode, the gateway's index), or every
    cache off; `out` collects its measurements."""

    def __init__(self, args: argparse.Namespace, model: Path, cache_on: bool) -> None:
        name = "cache_on" if cache_on else "cache_off"
        shared = ["--mem-fraction-static", "0.2"] if args.device.startswith("cuda") else []  # 4 workers, 1 GPU
        shared += dummy_weights(args)
        off = [] if cache_on else ["--disable-radix-cache"]
        self.ports = dict(zip(("prefill", "decode"), free_ports(2)))
        self.cluster = start_cluster(
            model, prefill=1, decode=1, extra_worker_args=(SPEC if args.spec else []) + shared + off,
            extra_prefill_args=["--device", args.device, "--chunked-prefill-size", "8192",
                                "--metrics-port", str(self.ports["prefill"])],
            extra_decode_args=["--device", args.device, "--max-running-requests", "64",
                               "--metrics-port", str(self.ports["decode"])],
            extra_gateway_args=off, log_dir=Path(args.log_dir) / name)
        self.out: dict[str, float] = {}
        self.stub: gateway_pb2_grpc.GatewayStub | None = None

    def ready(self) -> None:
        self.cluster.wait_ready(300)
        self.stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(self.cluster.gateway_address))

    def measured(self, key: str, prompts: list[list[int]]) -> None:
        """One round of `prompts`: its median TTFT under `key`, the cached fraction, and where the
        hits came from (per request: prefill-side and decode-side cached tokens, decode-local
        prefills, KV MiB sent)."""
        before = scrape(self.ports)
        self.out[key], self.out[f"{key}_cached"] = batch(self.stub, prompts)
        after = scrape(self.ports)
        for k in before:
            self.out[f"{key}_{k}"] = (after[k] - before[k]) / len(prompts)


def median_round(done: list[dict[str, float]], key: str) -> dict[str, float]:
    """The round whose `key` is the median of those after the first (which is unmeasured)."""
    measured = sorted(done[1:], key=lambda o: o[key])
    return measured[len(measured) // 2]


def run(args: argparse.Namespace, model: Path) -> tuple[dict[str, float], dict[str, float]]:
    """TTFTs with every cache on and with every cache off: both clusters run at once and take turns,
    round by round, on the same prompts (which cluster goes first alternates), so drift of the
    machine and the variance between process starts fall on both alike. Each measured round (fresh
    sessions, `--rounds` of them, the median kept) follows an unmeasured one of the same kind, so
    no kernel is compiled inside a measurement."""
    sides = [Side(args, model, True), Side(args, model, False)]
    gen = torch.Generator().manual_seed(0)

    def fresh(n: int) -> list[int]:
        return torch.randint(0, args.vocab, (n,), generator=gen).tolist()

    try:
        for side in sides:
            side.ready()
        keep = int(args.prompt * args.warm_fraction)
        turn_no = 0
        for conc in args.concurrency:
            rounds: dict[int, dict[str, list[dict[str, float]]]] = {id(s): {"cold": [], "warm": []} for s in sides}
            for r in range(args.rounds + 1):  # round 0: unmeasured, for the kernels of these shapes
                cold = [fresh(args.prompt) for _ in range(conc)]
                warm = [p[:keep] + fresh(args.prompt - keep) for p in cold]
                for side in sides[::-1] if turn_no % 2 else sides:
                    side.measured("x", cold)
                    rounds[id(side)]["cold"].append(dict(side.out))
                    side.measured("x", warm)
                    rounds[id(side)]["warm"].append(dict(side.out))
                turn_no += 1
            for side in sides:
                for kind, done in rounds[id(side)].items():
                    best = median_round(done, "x")
                    side.out.update({f"{kind}{conc}{k[1:]}": v for k, v in best.items() if k.startswith("x")})
        pairs: dict[int, list[dict[str, float]]] = {id(s): [] for s in sides}
        for r in range(args.rounds + 1):  # the first pair unmeasured; then the median of --rounds pairs
            long = fresh(args.last_page_prompt)
            for side in sides[::-1] if r % 2 else sides:
                side.measured("long_cold", [long])
                side.measured("long_again", [long])
                pairs[id(side)].append(dict(side.out))
        for side in sides:
            side.out.update({k: v for k, v in median_round(pairs[id(side)], "long_again").items() if k.startswith("long_")})
    finally:
        for side in sides:
            side.cluster.stop()
    return sides[0].out, sides[1].out


def turn(stub: gateway_pb2_grpc.GatewayStub, ids: list[int], max_tokens: int,
         routing_key: str | None = None) -> tuple[float, int, list[int]]:
    """(seconds to the first token, cached_tokens, output ids) of one greedy request."""
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids),
                                      prompt_cache=gateway_pb2.PromptCache(routing_key=routing_key))
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = max_tokens, 0.0, True
    t0 = time.perf_counter()
    first, cached, out = None, 0, []
    for r in stub.Generate(req, timeout=600):
        if r.token_ids and first is None:
            first = time.perf_counter() - t0
        out += list(r.token_ids)
        if r.HasField("usage"):
            cached = r.usage.cached_tokens
    return first, cached, out


def run_routing(args: argparse.Namespace, model: Path, cache_aware: bool, keys: bool = False) -> dict[str, float]:
    """Multi-turn sessions at once on --routing prefill workers; hit rate and TTFT of one routing mode
    (`keys`: each session sends its routing key, as clients with prompt_cache_key do)."""
    name = ("cache_aware_keys" if keys else "cache_aware") if cache_aware else "least_loaded"
    shared = ["--mem-fraction-static", str(0.8 / (args.routing + 1))] if args.device.startswith("cuda") else []
    shared += dummy_weights(args)
    cluster = start_cluster(model, prefill=args.routing, decode=1, extra_worker_args=shared,
                            extra_prefill_args=["--device", args.device, "--chunked-prefill-size", "8192",
                                                *(["--num-pages", str(args.prefill_pages)] if args.prefill_pages else [])],
                            extra_decode_args=["--device", args.device, "--max-running-requests", "64",
                                               *([] if args.decode_cache else ["--disable-radix-cache"])],
                            extra_gateway_args=[] if cache_aware else ["--disable-radix-cache"],
                            log_dir=Path(args.log_dir) / name)

    def session(seed: int) -> list[tuple[float, int, int, int]]:
        """(TTFT, cached tokens, prompt tokens, reusable tokens) of each turn; reusable = the whole
        pages of the previous turn's prompt (all a prefill worker can hold of it)."""
        rng = random.Random(seed)
        think = random.Random(seed + 1_000_003)

        def fresh(n: int) -> list[int]:
            return [rng.randrange(args.vocab) for _ in range(n)]

        ids, stats, before = fresh(args.prompt), [], 0
        for _ in range(args.turns):
            first, cached, out = turn(stub, ids, args.output, f"session-{seed}" if keys else None)
            stats.append((first, cached, len(ids), min(before, len(ids) - 1) // PAGE * PAGE))
            before = len(ids)
            ids = ids + out + fresh(args.turn_tokens)
            if args.think_ms:  # the user reads, a tool runs: other sessions' turns go first
                time.sleep(think.expovariate(1e3 / args.think_ms))
        return stats

    try:
        cluster.wait_ready(300)  # with HTTP on: until the gateway counts every worker healthy
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(cluster.gateway_address))
        turn(stub, [1] * args.prompt, 2)  # unmeasured: kernels for these shapes
        with ThreadPoolExecutor(args.sessions) as pool:
            stats = [s for per in pool.map(session, range(args.sessions)) for s in per]
    finally:
        cluster.stop()
    prompt_tokens = sum(s[2] for s in stats)
    return {"hit_rate": sum(s[1] for s in stats) / prompt_tokens,
            "best_rate": sum(s[3] for s in stats) / prompt_tokens,
            "hit_requests": sum(s[1] > 0 for s in stats) / len(stats),
            "ttft_ms": statistics.mean(s[0] for s in stats) * 1e3}


def routing_main(args: argparse.Namespace, model: Path) -> None:
    aware, load = run_routing(args, model, True), run_routing(args, model, False)
    final = args.prompt + (args.turns - 1) * (args.output + args.turn_tokens)  # a session's last prompt
    pool = (f"each prefill worker's pool {args.prefill_pages * PAGE} tokens against a working set of "
            f"{args.sessions * final} (all sessions' last prompts); " if args.prefill_pages else "")
    keyed = run_routing(args, model, True, keys=True) if args.routing_keys else None
    rows = [(f"{args.routing} prefill workers, {args.sessions} sessions x {args.turns} turns, first prompt "
             f"{args.prompt} tokens, +{args.output} output +{args.turn_tokens} new tokens per turn, think time "
             f"{args.think_ms:g} ms (mean); the decode worker's cache {'on' if args.decode_cache else 'off'}; "
             f"{pool}"
             f"best possible token hit rate {aware['best_rate']:.1%} (every turn on the worker holding its "
             f"history)"), "",
            "| routing | token hit rate | requests with a hit | mean TTFT (ms) |", "|---|---|---|---|"]
    modes = [("cache-aware", aware), ("least loaded", load)]
    if keyed is not None:
        modes.insert(1, ("cache-aware, sessions send routing keys", keyed))
    for name, r in modes:
        rows.append(f"| {name} | {r['hit_rate']:.1%} | {r['hit_requests']:.1%} | {r['ttft_ms']:.1f} |")
    ratio = aware["hit_rate"] / load["hit_rate"] if load["hit_rate"] else float("inf")
    rows.append(f"| cache-aware / least loaded | {ratio:.2f}x (target >= 3) | | "
                f"{aware['ttft_ms'] / load['ttft_ms']:.2f}x (target <= 0.5) |")
    text = "\n".join(rows)
    measure.publish("bench_prefix_cache_routing.md", args.device, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0", help="device of both workers")
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--prompt", type=int, default=8192)
    ap.add_argument("--warm-fraction", type=float, default=0.92)
    ap.add_argument("--last-page-prompt", type=int, default=10240)
    ap.add_argument("--spec", action="store_true", help="both workers run EAGLE (3,1,4)")
    ap.add_argument("--rounds", type=int, default=3, help="measured rounds per concurrency (the median is kept)")
    ap.add_argument("--prefill-ms", type=float, default=None,
                    help="a full-depth model's forward time of a --prompt prefill, to set the index cost against")
    ap.add_argument("--tiny", action="store_true", help="the tiny 3-layer model (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=AIR_LAYERS["num_layers"],
                    help="layers of the Air-shaped model (other than 4: dummy weights, no checkpoint written)")
    ap.add_argument("--model-dir", default=None, help="reuse a model directory (default: write one)")
    ap.add_argument("--log-dir", default=os.path.join(tempfile.gettempdir(), "glmserve_bench_prefix_cache"))
    ap.add_argument("--routing", type=int, default=0, metavar="N",
                    help="compare cache-aware and least-loaded routing on N prefill workers (see above)")
    ap.add_argument("--sessions", type=int, default=16, help="--routing: conversations at once")
    ap.add_argument("--turns", type=int, default=4, help="--routing: turns per conversation")
    ap.add_argument("--think-ms", type=float, default=0.0,
                    help="--routing: mean pause between a session's turns (exponential), 0 = none")
    ap.add_argument("--routing-keys", action="store_true",
                    help="--routing: also run cache-aware routing with each session sending a routing key")
    ap.add_argument("--output", type=int, default=64, help="--routing: output tokens per turn")
    ap.add_argument("--turn-tokens", type=int, default=256, help="--routing: new prompt tokens per turn")
    ap.add_argument("--prefill-pages", type=int, default=0,
                    help="--routing: each prefill worker's KV pool in pages (0: from memory); smaller than the "
                         "sessions' working set, the cache must choose what to keep, as with many sessions a worker")
    ap.add_argument("--decode-cache", action="store_true",
                    help="--routing: keep the decode worker's cache on (its hits then come with either routing)")
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.vocab = 700 if args.tiny else 800
    model = serving_model(args.tiny, layers=args.layers, model_dir=args.model_dir)
    if args.routing:
        routing_main(args, model)
        return
    on, off = run(args, model)

    def where(key: str) -> str:
        return (f"{on[f'{key}_prefill_hit']:.0f} / {on[f'{key}_decode_hit']:.0f} / {on[f'{key}_local']:.2f} / "
                f"{on[f'{key}_kv_bytes'] / 2**20:.1f} vs {off[f'{key}_kv_bytes'] / 2**20:.1f}")

    rows = [("| measure | cache on (ms) | cache off (ms) | ratio | cached | per request, cache on: prefill hit / "
             "decode hit tokens / local prefills / KV MiB sent (vs off) | target |"), "|---|---|---|---|---|---|---|"]
    for conc in args.concurrency:
        c, w = f"cold{conc}", f"warm{conc}"
        rows.append(f"| cold, {args.prompt} tokens, concurrency {conc} | {on[c]:.1f} | {off[c]:.1f} | "
                    f"{on[c] / off[c]:.3f} | 0 | {where(c)} | 0.98-1.02 |")
        rows.append(f"| warm, {args.prompt} tokens, concurrency {conc} | {on[w]:.1f} | {off[w]:.1f} | "
                    f"{on[w] / off[w]:.3f} of cache off | {on[f'{w}_cached']:.1%} | {where(w)} | "
                    f"<= 0.35 at concurrency 16 |")
    rows.append(f"| {args.last_page_prompt} tokens sent again (all but the last page cached) | "
                f"{on['long_again']:.1f} | {off['long_again']:.1f} | {on['long_again'] / off['long_again']:.3f} of "
                f"cache off | {on['long_again_cached']:.1%} | {where('long_again')} | <= 0.2 |")
    cost = index_cost_ms(args.prompt)
    rows.append(f"| index match + key, {args.prompt} tokens (host) | {cost:.2f} | | "
                f"{cost / off[f'cold{args.concurrency[0]}']:.4f} of this model's cold TTFT"
                + (f", {cost / args.prefill_ms:.4f} of a {args.prefill_ms:.0f} ms prefill" if args.prefill_ms else "")
                + " | | | <= 0.01 of the prefill's forward |")
    cold_on, cold_off = cold_cost_ms(args.prompt, True), cold_cost_ms(args.prompt, False)
    rows.append(f"| a cold {args.prompt}-token prompt's pages on one worker's engine thread (host: evict, key, "
                f"events) | {cold_on:.2f} | {cold_off:.2f} | +{cold_on - cold_off:.2f} ms | | | |")
    text = "\n".join(rows)
    measure.publish("bench_prefix_cache.md", args.device, text, f"; spec {args.spec}")


if __name__ == "__main__":
    main()
