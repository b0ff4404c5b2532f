"""Cache-aware routing through the real gateway and fake workers: a session follows the prefill
worker whose events say it holds the history (until the load threshold moves it), the approximate
index keeps sessions in place for workers without events, local prefill skips the prefill leg,
and POST /flush_cache reaches every worker and the index."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import aiohttp

from common.serving.cache_events import CacheEvents
from gateway.cache_index import PromptKeys
from protos import gateway_pb2
from tests.service.fake_workers import FAKE_NAMESPACE, Script, store_prompt
from tests.service.gateway_harness import collect, gateway_with_fakes, run

NO_THINK = gateway_pb2.Thinking(enabled=False)
QUESTION = "Please tell me about the weather in Paris and in Lyon, with every detail you know. " * 3


def _turns(n: int) -> list[gateway_pb2.ChatRequest]:
    """One conversation's requests: turn k carries the k - 1 earlier exchanges."""
    out, history = [], []
    for k in range(n):
        history.append(gateway_pb2.ChatMessage(role="user", content=f"{QUESTION} (question {k})"))
        out.append(gateway_pb2.ChatRequest(messages=list(history), thinking=NO_THINK))
        history.append(gateway_pb2.ChatMessage(role="assistant", content=f"answer {k}"))
    return out


async def _until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait for state the gateway reaches asynchronously (an event stream, a health round)."""
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(poll(), timeout)


def _script(tok) -> Script:
    ids = tok.encode("fine") + [tok.token_id("<|endoftext|>")]
    return Script(chunks=[ids], finish_token=ids[-1])


def test_a_session_follows_the_prefill_worker_its_events_name(model_dir, tok) -> None:
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: _script(tok), n_prefill=2, routing_load_threshold=4) as h:
            router, fakes = h.gateway.router, h.cluster.prefills
            for f in fakes:
                f.cache_events = CacheEvents(16, FAKE_NAMESPACE)
            await _until(lambda: all(router.index.is_live(w.address) for w in router.prefill))
            turns = _turns(4)
            placed = []
            for k, req in enumerate(turns):
                if k == 3:  # the session's worker is now 5 requests busier than the other: threshold 4
                    hot = router.prefill[placed[0]]
                    fakes[placed[0]].load.running = 5
                    await _until(lambda hot=hot: hot.load.running == 5)
                before = [len(f.requests) for f in fakes]
                await collect(h.stub.Chat(req))
                owner = next(i for i, f in enumerate(fakes) if len(f.requests) > before[i])
                placed.append(owner)
                ids = list(fakes[owner].requests[-1].input_ids)
                # the stored event reaches the gateway before the next turn is routed
                await _until(lambda w=router.prefill[owner].address, ids=ids:
                             router.index.hit(w, PromptKeys(ids), 16).tokens == (len(ids) - 1) // 16 * 16)
            return placed

    placed = run(scenario())
    assert placed[1] == placed[0] and placed[2] == placed[0]
    assert placed[3] != placed[0]



def test_without_events_the_approximate_index_keeps_a_session_in_place(model_dir, tok) -> None:
    async def scenario(**overrides):
        async with gateway_with_fakes(model_dir, lambda r: _script(tok), n_prefill=2, **overrides) as h:
            for req in _turns(4):  # the fakes answer WatchCache with UNIMPLEMENTED
                await collect(h.stub.Chat(req))
            return [len(f.requests) for f in h.cluster.prefills], h.gateway.router.index

    counts, index = run(scenario())
    assert sorted(counts) == [0, 4] and index.approx_pages > 0 and index.exact_pages == 0
    counts, index = run(scenario(disable_radix_cache=True))  # plain load routing: round robin on ties
    assert counts == [2, 2] and index is None


async def _again_once_decode_holds_it(h) -> tuple[dict, list[int]]:
    """One chat turn, then the decode worker's events say it holds that prompt (as a decode-side cache
    would after the request), then the same turn again: (the second answer, the prompt's ids)."""
    router, decode = h.gateway.router, h.cluster.decodes[0]
    decode.cache_events = CacheEvents(16, FAKE_NAMESPACE)
    await _until(lambda: router.index.is_live(router.decode[0].address))
    req = _turns(1)[0]
    await collect(h.stub.Chat(req))
    ids = list(decode.requests[-1].input_ids)
    store_prompt(decode.cache_events, ids)
    await _until(lambda: router.index.hit(router.decode[0].address, PromptKeys(ids), 16).tokens > 0)
    _, again = await collect(h.stub.Chat(req))
    return again, ids


def test_local_prefill_skips_the_prefill_leg_when_decode_holds_the_prompt(model_dir, tok) -> None:
    async def scenario(limit: int):
        async with gateway_with_fakes(model_dir, lambda r: _script(tok), local_prefill_max_tokens=limit) as h:
            again, ids = await _again_once_decode_holds_it(h)
            return h.cluster.decodes[0].requests[-1], len(h.cluster.prefills[0].requests), again["usage"], len(ids)

    second, prefills, usage, n = run(scenario(32))
    assert second.local_prefill and second.prefill_worker_id == "" and prefills == 1
    assert usage.cached_tokens == (n - 1) // 16 * 16 and usage.prompt_tokens == n
    second, prefills, _, _ = run(scenario(0))  # off: the prefill leg always runs
    assert not second.local_prefill and prefills == 2


def test_a_refused_local_prefill_falls_back_to_the_prefill_leg_on_the_same_decode_worker(model_dir, tok) -> None:
    def script_for(r) -> Script:
        refused = Script(decode_error="FAILED_PRECONDITION")  # the prefix was evicted meanwhile
        return refused if getattr(r, "local_prefill", False) else _script(tok)

    async def scenario():
        async with gateway_with_fakes(model_dir, script_for, local_prefill_max_tokens=32) as h:
            again, _ = await _again_once_decode_holds_it(h)
            return [r.local_prefill for r in h.cluster.decodes[0].requests], len(h.cluster.prefills[0].requests), again

    locals_, prefills, again = run(scenario())
    assert locals_ == [False, True, False] and prefills == 2
    assert again["content"] == "fine" and again["finish"].finish_reason == "stop"


def test_flush_cache_over_http_reaches_every_worker_and_the_index(model_dir, tok) -> None:
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: _script(tok), api_key="sekret") as h:
            router, prefill = h.gateway.router, h.cluster.prefills[0]
            prefill.cache_events = CacheEvents(16, FAKE_NAMESPACE)
            await _until(lambda: router.index.is_live(router.prefill[0].address))
            await collect(h.stub.Chat(_turns(1)[0]))
            await _until(lambda: router.index.exact_pages > 0)
            approx_before = router.index.approx_pages
            url = f"http://127.0.0.1:{h.gateway.http_port}/flush_cache"
            async with aiohttp.ClientSession() as s:
                async with s.get(f"http://127.0.0.1:{h.gateway.http_port}/metrics") as r:
                    exposition = await r.text()
                async with s.post(url) as r:
                    refused = r.status
                async with s.post(url, headers={"Authorization": "Bearer sekret"}) as r:
                    status, body = r.status, await r.json()
            await _until(lambda: router.index.exact_pages == 0)  # the worker's reset event
            return refused, status, body, approx_before, router.index.approx_pages, h.cluster, exposition
    refused, status, body, approx_before, approx_after, cluster, exposition = run(scenario())
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in exposition.splitlines()
               if line.startswith("glmserve_router_")}
    assert samples['glmserve_router_decisions_total{reason="load",role="prefill"}'] >= 1
    assert samples['glmserve_router_index_pages{kind="approx"}'] == approx_before
    assert samples["glmserve_router_cache_events_total"] >= 2  # the reset and the stored pages
    assert refused == 401
    assert status == 200 and body == {"flushed": True, "workers": {
        cluster.prefill_addrs[0]: 3, cluster.decode_addrs[0]: "unsupported"}}
    assert cluster.prefills[0].flushes == 1 and cluster.decodes[0].flushes == 1
    assert approx_before == 0 and approx_after == 0  # a worker streaming events gets no approximate entries


def test_a_stream_that_ends_drops_the_workers_exact_entries(model_dir, tok) -> None:
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: _script(tok)) as h:
            router, prefill = h.gateway.router, h.cluster.prefills[0]
            prefill.cache_events = CacheEvents(16, FAKE_NAMESPACE)
            address = router.prefill[0].address
            await _until(lambda: router.index.is_live(address))
            await collect(h.stub.Chat(_turns(1)[0]))
            await _until(lambda: router.index.exact_pages > 0)
            prefill.cache_events.close()  # as a draining worker does
            await _until(lambda: not router.index.is_live(address))
            return router.index.exact_pages, router.index.hit(address, PromptKeys(prefill.requests[0].input_ids), 16)

    exact, hit = run(scenario())
    # its exact entries go with the stream, and none were approximate while it was live: the next
    # stream starts with its whole index
    assert exact == 0 and not hit.exact and hit.tokens == 0


def test_finished_requests_are_no_load_before_the_next_poll(model_dir, tok) -> None:
    async def scenario():  # one health round at start, the next in 30 s: none during the requests
        async with gateway_with_fakes(model_dir, lambda r: _script(tok), health_check_interval=30.0) as h:
            router = h.gateway.router
            polls = [w.polls for w in router.workers]
            for chat in _turns(3):
                await collect(h.stub.Chat(chat))
            seen = [(w.dispatched_since_poll, w.score, w.polls) for w in router.workers]
            return polls, seen

    polls, seen = run(scenario())
    assert all(p == now for p, (*_, now) in zip(polls, seen)), "a health poll ran inside the test"
    assert [(d, score) for d, score, _ in seen] == [(0, 0), (0, 0)]


def test_a_finished_prefill_leg_leaves_no_queued_compute(model_dir, tok) -> None:
    """The routing estimate's queue on a worker ends with the last leg this gateway sent there, however
    slow the estimate said it would be."""
    async def scenario():
        async with gateway_with_fakes(model_dir, lambda r: _script(tok)) as h:
            w = h.gateway.router.prefill[0]
            w.prefill_rate = 1.0  # one token a second: the prompt "queues" for many seconds
            await collect(h.stub.Chat(_turns(1)[0]))
            await _until(lambda: w.pending_tokens == 0)
            return w.queued_seconds(time.monotonic())

    assert run(scenario()) == 0.0
