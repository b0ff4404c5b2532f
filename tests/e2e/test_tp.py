"""Tensor-parallel workers through the gateway (real processes, CPU, gloo): greedy outputs of a batch
of 8 concurrent requests with chunked prefill equal the single-process reference for (prefill TP,
decode TP) = (2, 1) without EAGLE, (1, 2) with EAGLE (chain), (2, 4) with an EAGLE tree (top-k 2:
KV slot copies on every rank) and (2, 2) without, a prompt reusing cached prefix pages included; then a decode worker whose TP rank 1 is killed
fails its streams with UNAVAILABLE naming the rank within seconds and exits, and the other decode
worker keeps serving correct tokens."""

from __future__ import annotations

import os
import random
import re
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from protos import gateway_pb2
from tests.e2e.conftest import (
    free_pages,
    gateway,
    generate,
    generate_after_failover,
    streams_on,
    wait_pages_free,
)

SPEC_CHAIN = ["--speculative-algorithm", "EAGLE"]
SPEC_TREE = [*SPEC_CHAIN, "--speculative-num-steps", "3", "--speculative-eagle-topk", "2",
             "--speculative-num-draft-tokens", "5"]


def _batch_matches(cluster, reference, seed: int) -> None:
    rng = random.Random(seed)
    work = [([rng.randrange(700) for _ in range(rng.randrange(1, 45))], rng.randrange(1, 12)) for _ in range(8)]
    stub = gateway(cluster)
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda w: generate(stub, w[0], max_tokens=w[1], temperature=0.0, ignore_eos=True),
                                work))
    for (ids, max_tokens), got in zip(work, results):
        assert got.tokens == reference.greedy(ids, max_tokens), f"prompt of {len(ids)} tokens diverged"


@pytest.mark.parametrize(("prefill_tp", "decode_tp", "spec"),
                         [(2, 1, []), (1, 2, SPEC_CHAIN), (2, 2, []), (2, 4, SPEC_TREE)],
                         ids=["p2-d1", "p1-d2-eagle", "p2-d2", "p2-d4-eagle-tree"])
def test_greedy_outputs_equal_the_reference(launch, tiny_model_dir, reference, prefill_tp, decode_tp, spec) -> None:
    # chunks of 16 tokens: prompts up to 44 tokens take up to 3 forwards, several prompts share one
    cluster = launch(tiny_model_dir, extra_worker_args=spec,
                     extra_prefill_args=["--tp-size", str(prefill_tp), "--chunked-prefill-size", "16"],
                     extra_decode_args=["--tp-size", str(decode_tp)])
    before = free_pages(cluster)
    _batch_matches(cluster, reference, seed=prefill_tp * 10 + decode_tp)
    # a prompt sharing 2 whole pages with an earlier one: every rank sends its heads of the cached range
    first = [random.Random(5).randrange(700) for _ in range(40)]
    generate(gateway(cluster), first, max_tokens=2, temperature=0.0, ignore_eos=True)
    again = generate(gateway(cluster), first[:37] + [1, 2, 3], max_tokens=6, temperature=0.0, ignore_eos=True)
    assert again.tokens == reference.greedy(first[:37] + [1, 2, 3], 6) and again.usage.cached_tokens == 32
    assert wait_pages_free(cluster, before) == before, "KV pages leaked"


def _stream(stub, ids: list[int], max_tokens: int):
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens, req.sampling.temperature, req.sampling.ignore_eos = max_tokens, 0.0, True
    return stub.Generate(req, timeout=60)


def _follower_pid(cluster, name: str) -> int:
    """TP rank 1 of worker `name`, from the line its leader logs once the ranks are up."""
    text = (cluster.log_dir / f"{name}.log").read_text()
    return int(re.search(r"ranks 1\.\.\d+ up \(pids \[(\d+)", text).group(1))


def test_killed_rank_fails_its_worker_fast_and_the_other_worker_serves(launch, tiny_model_dir, reference) -> None:
    cluster = launch(tiny_model_dir, prefill=1, decode=2, extra_prefill_args=["--tp-size", "2"],
                     extra_decode_args=["--tp-size", "2"])
    _batch_matches(cluster, reference, seed=22)
    stub = gateway(cluster)
    calls = [_stream(stub, [7 + i, 8, 9, 10], max_tokens=900) for i in range(4)]
    iters = [iter(c) for c in calls]
    for it in iters:
        next(it)  # every request is streaming
    running = {i: streams_on(port) for i, port in enumerate(cluster.decode_ports)}
    victim = max(running, key=running.get)
    assert running[victim] > 0, running
    follower = _follower_pid(cluster, f"decode{victim}")
    outcomes: dict[int, tuple] = {}

    def watch(n: int) -> None:
        try:
            for _ in iters[n]:
                pass
            outcomes[n] = ("finished", "", time.monotonic() - t0)
        except grpc.RpcError as e:
            outcomes[n] = (e.code(), e.details(), time.monotonic() - t0)
        except Exception as e:  # noqa: BLE001 - anything else shows in the assertion's message
            outcomes[n] = ("raised", repr(e), time.monotonic() - t0)

    t0 = time.monotonic()
    os.kill(follower, signal.SIGKILL)
    watchers = [threading.Thread(target=watch, args=(n,)) for n in range(len(calls))]
    for w in watchers:
        w.start()
    leader = cluster.procs[f"decode{victim}"]
    assert leader.wait(timeout=10) == 3  # common.worker.base.TP_BROKEN_EXIT
    time.sleep(1.0)
    for c in calls:
        c.cancel()  # the survivors are healthy; stop them
    for w in watchers:
        w.join(10)
    failed = [o for o in outcomes.values() if o[0] == grpc.StatusCode.UNAVAILABLE]
    assert len(failed) == running[victim], outcomes
    assert max(t for _, _, t in failed) < 10.0
    assert all(f"TP rank 1 (pid {follower}) exited with code -9" in details for _, details, _ in failed), failed
    # new requests go to the surviving decode worker (after at most one health poll) and are correct
    for i in range(3):
        ids = [30 + i, 31, 32]
        assert generate_after_failover(stub, ids, 5).tokens == reference.greedy(ids, 5)
