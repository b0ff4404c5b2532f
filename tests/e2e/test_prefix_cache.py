"""The prefill worker's prefix cache through real processes: a multi-turn conversation gives the
greedy tokens of the uncached single-process reference, reports the pages it reused as
`cached_tokens` (gRPC and HTTP), shares pages only under the same cache salt, gives every page back, and with --disable-radix-cache (on both
workers) reuses nothing. With EAGLE a shared prefix ending at a page edge gives up that page (its draft KV saw
another next token)."""

from __future__ import annotations

import random

import grpc
import openai
import pytest

from protos import worker_pb2
from tests.e2e.conftest import free_pages, gateway, generate, wait_pages_free, worker_stub
from tests.e2e.test_speculative import spec_args

PAGE = 16  # the workers' default page size


@pytest.mark.parametrize("eagle,cache", [(True, True), (True, False), (False, True)],
                         ids=["eagle", "eagle-cache-off", "plain"])
def test_multi_turn_reuses_the_prompt_pages_and_matches_the_reference(launch, tiny_model_dir, reference,
                                                                      eagle, cache):
    worker_args = [*(spec_args(3, 1, 4) if eagle else []), *([] if cache else ["--disable-radix-cache"])]
    cluster = launch(tiny_model_dir, extra_worker_args=worker_args,  # both workers' caches on or off
                     extra_prefill_args=["--chunked-prefill-size", "16"])
    stub = gateway(cluster)
    before = free_pages(cluster)
    rng = random.Random(20)
    events = worker_stub(cluster.prefill_ports[0], "prefill").WatchCache(worker_pb2.WatchCacheRequest(), timeout=30)
    if cache:  # the stream opens with the (empty) index
        assert next(events).reset
        events.cancel()
    else:  # no cache, no events: the gateway falls back to its approximate index
        with pytest.raises(grpc.RpcError) as refused:
            next(events)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION

    def words(n: int) -> list[int]:
        return [rng.randrange(700) for _ in range(n)]

    first = words(37)
    out = generate(stub, first, max_tokens=8, temperature=0.0, ignore_eos=True).tokens
    second = first + out + words(5)  # shares 37 tokens: 2 whole pages and 5 tokens into the third
    edge = first[:2 * PAGE] + [first[2 * PAGE] + 1] + words(8)  # shares exactly 2 pages
    turns = [(first, 0), (second, 2 * PAGE), (edge, PAGE if eagle else 2 * PAGE)]
    for ids, cached in turns[1:]:
        got = generate(stub, ids, max_tokens=10, temperature=0.0, ignore_eos=True)
        assert got.tokens == reference.greedy(ids, 10), f"a {len(ids)}-token turn diverged"
        assert got.usage.cached_tokens == (cached if cache else 0)
    assert out == reference.greedy(first, 8)
    # the decode worker now holds 3 pages of `second` and all but 2 tokens: it computes them itself
    got = generate(stub, second, max_tokens=4, temperature=0.0, ignore_eos=True)
    assert got.tokens == reference.greedy(second, 4) and got.usage.cached_tokens == (3 * PAGE if cache else 0)
    client = openai.OpenAI(base_url=cluster.http_base_url, api_key="EMPTY", max_retries=0)
    again = client.completions.create(model="glm-tiny", prompt=second, max_tokens=4, temperature=0,
                                      extra_body={"ignore_eos": True})
    # the second turn's third page is cached now too, its successor being the prompt's next token
    assert again.usage.prompt_tokens_details.cached_tokens == (3 * PAGE if cache else 0)
    # a cache salt: none of the unsalted pages, then its own; another salt shares nothing with it
    salted = [client.completions.create(model="glm-tiny", prompt=second, max_tokens=4, temperature=0,
                                        extra_body={"ignore_eos": True, "cache_salt": salt})
              for salt in ("tenant-a", "tenant-a", "tenant-b")]
    assert [s.usage.prompt_tokens_details.cached_tokens for s in salted] == [0, 3 * PAGE if cache else 0, 0]
    assert all(s.choices[0].text == again.choices[0].text for s in salted)
    assert wait_pages_free(cluster, before) == before, "KV pages leaked"
