"""Failure behaviour of the disaggregated path with real processes: cancellation, deadlines, dead
workers, refused pairs, full queues, and a soak that must leak no pages, threads or descriptors."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from common.tools.tiny_model import make_tiny_model
from protos import gateway_pb2
from tests.e2e.conftest import (
    free_pages,
    gateway,
    generate,
    generate_after_failover,
    load_of,
    proc_stats,
    streams_on,
    wait_pages_free,
)


def _stream(stub, ids, max_tokens, timeout=60.0):
    req = gateway_pb2.GenerateRequest(tokens=gateway_pb2.TokenIds(ids=ids))
    req.sampling.max_tokens = max_tokens
    req.sampling.temperature = 0.0
    req.sampling.ignore_eos = True
    return stub.Generate(req, timeout=timeout)


def test_client_cancel_and_deadline_free_pages_on_both_workers(launch, tiny_model_dir):
    cluster = launch(tiny_model_dir)
    before = free_pages(cluster)
    stub = gateway(cluster)
    call = _stream(stub, list(range(10, 60)), max_tokens=800)
    first = next(iter(call))  # generation is running
    assert first.token_ids
    call.cancel()
    assert wait_pages_free(cluster, before) == before, "cancelled request kept KV pages"

    with pytest.raises(grpc.RpcError) as err:
        for _ in _stream(stub, list(range(10, 60)), max_tokens=900, timeout=0.5):
            pass
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_pages_free(cluster, before) == before, "expired request kept KV pages"
    # the workers still serve
    assert generate(stub, [5, 6, 7], max_tokens=3, temperature=0.0, ignore_eos=True).finish == "length"


def test_decode_killed_mid_stream_fails_fast_and_others_continue(launch, tiny_model_dir, reference):
    cluster = launch(tiny_model_dir, prefill=1, decode=2)
    stub = gateway(cluster)
    calls = [_stream(stub, [7 + i, 8, 9, 10], max_tokens=900) for i in range(4)]
    iters = [iter(c) for c in calls]
    for it in iters:
        next(it)  # every request is streaming
    running = {i: streams_on(port) for i, port in enumerate(cluster.decode_ports)}
    victim = max(running, key=running.get)  # the worker serving most of the streams
    assert running[victim] > 0, running
    outcomes: dict[int, tuple] = {}

    def watch(n: int) -> None:  # one thread per stream: each failure is seen when it happens
        try:
            for _ in iters[n]:
                pass
            outcomes[n] = ("finished", time.monotonic() - t0)
        except grpc.RpcError as e:
            outcomes[n] = (e.code(), time.monotonic() - t0)

    t0 = time.monotonic()
    os.kill(cluster.procs[f"decode{victim}"].pid, signal.SIGKILL)
    watchers = [threading.Thread(target=watch, args=(n,)) for n in range(len(calls))]
    for w in watchers:
        w.start()
    time.sleep(10.0)
    for c in calls:
        c.cancel()  # the survivors are healthy; stop them
    for w in watchers:
        w.join(10)
    unavailable = [t for code, t in outcomes.values() if code == grpc.StatusCode.UNAVAILABLE]
    assert len(unavailable) == running[victim], f"streams on the dead worker: {running[victim]}, seen: {outcomes}"
    assert max(unavailable) < 10.0, "clients of the dead worker waited too long"
    # new requests route around the dead worker and are still correct; a client may see
    # UNAVAILABLE for at most one health-check interval while the gateway re-polls its workers
    for i in range(3):
        ids = [20 + i, 21, 22]
        assert generate_after_failover(stub, ids, 5).tokens == reference.greedy(ids, 5)


def test_prefill_killed_mid_transfer_frees_decode_pages(launch, tiny_model_dir):
    # chunk of 1 token: a 400-token prompt streams its KV over ~400 forwards
    cluster = launch(tiny_model_dir, prefill=1, decode=1, extra_prefill_args=["--chunked-prefill-size", "1"],
                     extra_worker_args=["--transfer-timeout", "4"])
    before = free_pages(cluster)
    decode_before = {k: v for k, v in before.items() if k[0] == "decode"}
    stub = gateway(cluster)
    errors = []

    def run() -> None:
        try:
            for _ in _stream(stub, [(5 * i) % 700 for i in range(400)], max_tokens=5, timeout=60):
                pass
        except grpc.RpcError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    # kill once the decode worker holds the request's pages and waits for its KV: mid-transfer by
    # construction (a fixed sleep let a fast machine finish the whole request first)
    decode_port = cluster.decode_ports[0]
    deadline = time.monotonic() + 30
    while load_of(decode_port, "decode").waiting_for_kv == 0:
        assert t.is_alive() and time.monotonic() < deadline, "the transfer never started"
        time.sleep(0.01)
    os.kill(cluster.procs["prefill0"].pid, signal.SIGKILL)
    t.join(60)
    assert not t.is_alive(), "client hung after the prefill worker died"
    assert errors and errors[0].code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED), errors
    assert wait_pages_free(cluster, decode_before, timeout=20) == decode_before, "decode kept the reserved pages"


@pytest.mark.parametrize("mismatch", ["page_size", "model"])
def test_incompatible_pair_is_refused_naming_the_difference(launch, tiny_model_dir, tmp_path, mismatch):
    if mismatch == "page_size":
        cluster = launch(tiny_model_dir, extra_prefill_args=["--page-size", "32"],
                         extra_decode_args=["--page-size", "16"])
        expect = "page_size"
    else:
        # prefill (and gateway) on another checkpoint of the same architecture; the decode
        # worker's later --model-path wins
        other = make_tiny_model(tmp_path / "other", seed=7)
        cluster = launch(other, extra_decode_args=["--model-path", str(tiny_model_dir)])
        expect = "model_fingerprint"
    with pytest.raises(grpc.RpcError) as err:
        generate(gateway(cluster), [5, 6, 7], max_tokens=3, temperature=0.0)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION, err.value
    assert expect in err.value.details()


def test_queue_full_is_resource_exhausted(launch, tiny_model_dir):
    # 9 pages of 16 tokens: one 100-token request holds 7, the next waits, the third is refused
    cluster = launch(tiny_model_dir, extra_decode_args=["--num-pages", "10", "--max-queued-requests", "1",
                                                        "--max-running-requests", "1"])
    stub = gateway(cluster)
    holder = _stream(stub, list(range(1, 101)), max_tokens=800)
    next(iter(holder))
    waiting = _stream(stub, list(range(2, 102)), max_tokens=5)
    deadline = time.monotonic() + 30  # until the second request sits in the decode queue
    while load_of(cluster.decode_ports[0], "decode").queued == 0:
        assert time.monotonic() < deadline, "the second request never reached the decode queue"
        time.sleep(0.01)
    with pytest.raises(grpc.RpcError) as err:
        generate(stub, list(range(3, 103)), max_tokens=5, temperature=0.0)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, err.value
    holder.cancel()
    assert [r for r in waiting][-1].finish.finish_reason == "length"


def test_soak_leaks_no_pages_threads_or_fds(launch, tiny_model_dir):
    cluster = launch(tiny_model_dir, prefill=1, decode=1)
    stub = gateway(cluster)
    before = free_pages(cluster)

    def one(i: int) -> str:
        return generate(stub, [(i * 7 + j) % 700 for j in range(1 + i % 40)], max_tokens=1 + i % 6,
                        temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True).finish

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(40)))  # warm-up: lazily created threads/channels exist now
    warm = {n: proc_stats(p.pid) for n, p in cluster.procs.items()}
    with ThreadPoolExecutor(16) as pool:
        finishes = list(pool.map(one, range(300)))
    assert finishes.count("length") == 300
    assert wait_pages_free(cluster, before) == before, "pages leaked"
    time.sleep(0.5)
    after = {n: proc_stats(p.pid) for n, p in cluster.procs.items()}
    for name, (t0, f0) in warm.items():
        t1, f1 = after[name]
        assert t1 <= t0 + 2, f"{name}: threads grew {t0} -> {t1}"
        assert f1 <= f0 + 4, f"{name}: file descriptors grew {f0} -> {f1}"


@pytest.mark.parametrize("spec", [[], ["--speculative-algorithm", "EAGLE"]])
def test_pool_exhausted_mid_generation_retracts_and_resumes_exactly(launch, tiny_model_dir, reference, spec):
    # 13 usable pages of 16 tokens: two 20-token prompts growing to 150 tokens each need 20 pages,
    # so one request is retracted mid-generation, its KV recomputed on resume, and both must still
    # produce exactly the reference tokens
    cluster = launch(tiny_model_dir, extra_worker_args=spec, extra_decode_args=["--num-pages", "14"])
    before = free_pages(cluster)
    stub = gateway(cluster)
    prompts = [[(3 * i + 11 * j) % 700 for j in range(20)] for i in range(2)]
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda ids: generate(stub, ids, max_tokens=130, temperature=0.0, ignore_eos=True,
                                                 timeout=120), prompts))
    for ids, g in zip(prompts, got):
        assert g.tokens == reference.greedy(ids, 130)
    assert wait_pages_free(cluster, before) == before
    log = (cluster.log_dir / "decode0.log").read_text()
    assert "retracted" in log, "the pool never ran out: the test did not exercise retraction"
