"""Greedy outputs through gateway -> prefill -> decode (real processes) equal the single-process
reference, for concurrent requests of different prompt and output lengths, chunked prefill on."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

from tests.e2e.conftest import free_pages, gateway, generate, wait_pages_free


def _workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(vocab) for _ in range(rng.randrange(1, 70))], rng.randrange(1, 24)) for _ in range(n)]


def test_sixteen_concurrent_requests_match_reference(launch, tiny_model_dir, reference):
    # chunk of 16 tokens: prompts up to 69 tokens are split over up to 5 forwards, and several
    # prompts share a forward; two decode workers so routing spreads the load
    cluster = launch(tiny_model_dir, prefill=1, decode=2, extra_prefill_args=["--chunked-prefill-size", "16"])
    before = free_pages(cluster)
    work = _workload(16, seed=1, vocab=700)
    stub = gateway(cluster)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda w: generate(stub, w[0], max_tokens=w[1], temperature=0.0, ignore_eos=True),
                                work))
    for (ids, max_tokens), got in zip(work, results):
        want = reference.greedy(ids, max_tokens)
        assert got.tokens == want, f"prompt of {len(ids)} tokens diverged"
        assert got.finish == "length"
        assert got.usage.completion_tokens == max_tokens and got.usage.prompt_tokens == len(ids)
    assert wait_pages_free(cluster, before) == before, "KV pages leaked"


def test_eos_stops_and_is_reported(launch, tiny_model_dir, reference):
    cluster = launch(tiny_model_dir)
    stub = gateway(cluster)
    ids = [5, 6, 7, 8]
    free_run = reference.greedy(ids, 12)
    stop_tok = free_run[3]  # make the 4th generated token a stop id
    got = generate(stub, ids, max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_tok])
    assert got.tokens == free_run[: free_run.index(stop_tok) + 1]
    assert got.finish == "stop" and got.matched_token == stop_tok
