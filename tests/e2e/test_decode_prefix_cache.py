"""The decode worker's prefix cache through real processes (EAGLE on, the prefill worker's own cache
off so every cached token reported is the decode side's), and a soak of concurrent conversations
with cancellations on a decode pool too small for them all.

A conversation whose next prompt is the previous prompt + its output + new text finds the output's
pages on the decode worker: the prefill worker sends only the KV after them; a short uncached suffix
is computed on the decode worker (no KV sent); a request with `local_prefill` needs no prefill leg at
all. Every turn gives the greedy tokens of the uncached single-process reference; FlushCache forgets
it all; every page comes back."""

from __future__ import annotations

import random
import threading
import time
import urllib.request

import grpc

from common.serving.sampling_params import SamplingParams
from common.tools.launch import free_ports
from protos import worker_pb2
from tests.e2e.conftest import free_pages, gateway, generate, wait_pages_free, worker_stub
from tests.e2e.test_speculative import spec_args

PAGE = 16  # the workers' default page size
LOCAL = 16  # --decode-local-prefill-tokens


def decode_metric(port: int, name: str, expected: float, timeout: float = 5.0) -> float:
    """A counter of the decode worker's /metrics once it equals `expected` (the engine reports it at
    the end of its turn, just after the answer left), or the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        seen = next((float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " ")), 0.0)
        if seen == expected or time.monotonic() > deadline:
            return seen
        time.sleep(0.05)


def test_turns_reuse_decode_pages_compute_short_suffixes_there_and_match_the_reference(launch, tiny_model_dir,
                                                                                       reference):
    (metrics_port,) = free_ports(1)
    cluster = launch(tiny_model_dir, extra_worker_args=spec_args(3, 1, 4),
                     extra_prefill_args=["--disable-radix-cache"],
                     extra_decode_args=["--decode-local-prefill-tokens", str(LOCAL),
                                        "--metrics-port", str(metrics_port)])
    stub = gateway(cluster)
    before = free_pages(cluster)
    rng = random.Random(21)
    local_total = "glmserve_decode_prefix_cache_local_prefills_total"

    def words(n: int) -> list[int]:
        return [rng.randrange(700) for _ in range(n)]

    def turn(ids: list[int], max_tokens: int, cached: int) -> list[int]:
        got = generate(stub, ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        assert got.tokens == reference.greedy(ids, max_tokens), f"a {len(ids)}-token turn diverged"
        assert got.usage.cached_tokens == cached, f"a {len(ids)}-token turn"
        return got.tokens

    first = words(20)
    out1 = turn(first, 30, 0)  # KV written for 49 tokens: 3 whole pages kept, 2 of them output
    second = first + out1 + words(20)  # 70 tokens, 22 uncached (> LOCAL): the prefill leg sends 22
    out2 = turn(second, 14, 3 * PAGE)
    assert decode_metric(metrics_port, local_total, 0) == 0
    third = second + out2 + words(2)  # 86 tokens; 5 pages (80) kept: 6 uncached, computed on decode
    turn(third, 8, 5 * PAGE)
    assert decode_metric(metrics_port, local_total, 1) == 1

    # no prefill leg at all: the decode worker computes what it lacks (a prefix ending inside a page)
    fourth = third[:75] + words(3)
    sampling = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True).to_wire()
    chunks = list(worker_stub(cluster.decode_ports[0], "decode").Generate(worker_pb2.DecodeRequest(
        request_id="local-1", transfer_id=4242, input_ids=fourth, sampling=sampling, local_prefill=True),
        timeout=30))
    assert [t for c in chunks for t in c.token_ids] == reference.greedy(fourth, 6)
    assert chunks[-1].HasField("finish")
    assert decode_metric(metrics_port, local_total, 2) == 2

    freed = worker_stub(cluster.decode_ports[0], "decode").FlushCache(worker_pb2.FlushCacheRequest(), timeout=10)
    assert freed.pages_freed > 0
    turn(second, 4, 0)  # nothing held any more
    assert wait_pages_free(cluster, before) == before, "KV pages leaked"


def test_concurrent_conversations_with_cancellations_on_a_small_pool_leak_nothing(launch, tiny_model_dir,
                                                                                  reference):
    """Three conversations of four turns at once on a decode worker of 12 pages (each conversation
    grows to about 6, a cancelled turn more): requests queue for memory, cached pages are evicted
    and running ones retracted while others hold theirs; every turn that was not cancelled gives the
    reference tokens; at the end every page is free or idle in the cache."""
    (metrics_port,) = free_ports(1)
    cluster = launch(tiny_model_dir, extra_decode_args=["--num-pages", "13", "--metrics-port", str(metrics_port)])
    stub = gateway(cluster)
    before = free_pages(cluster)
    failures: list[str] = []

    def conversation(seed: int) -> None:
        rng = random.Random(seed)
        ids = [rng.randrange(700) for _ in range(20)]
        for turn in range(4):
            try:
                if turn == 1 + seed % 3:  # one turn per conversation is cancelled mid-flight
                    generate(stub, ids, max_tokens=200, temperature=0.0, ignore_eos=True, timeout=0.3)
                    continue
                got = generate(stub, ids, max_tokens=12, temperature=0.0, ignore_eos=True).tokens
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    failures.append(f"conversation {seed} turn {turn}: {e.code()} {e.details()}")
                continue
            if got != reference.greedy(ids, 12):
                failures.append(f"conversation {seed} turn {turn} diverged")
            ids = ids + got + [rng.randrange(700) for _ in range(6)]

    threads = [threading.Thread(target=conversation, args=(seed,)) for seed in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not failures, failures
    def seen(name: str) -> float:
        return decode_metric(metrics_port, f"glmserve_decode_prefix_cache_{name}_total", -1, timeout=0)

    assert seen("hit_tokens") > 0 and seen("local_prefills") > 0  # evictions depend on the timing
    assert wait_pages_free(cluster, before) == before, "KV pages leaked"
