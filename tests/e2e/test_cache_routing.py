"""Cache-aware routing through real processes: two prefill workers stream their prefix-cache events
(a reset with the whole index, then the keys each prompt stores, page_hash chains under the
namespace the event names); a conversation's later turns land on the prefill worker holding its
history and report cached_tokens; fresh prompts with one routing key land on one worker; POST /flush_cache empties every worker (a reset on the stream)
and the next turn computes everything again."""

from __future__ import annotations

import queue
import random
import threading
import urllib.request

import grpc

from common.serving.page_hash import page_key, root_key
from protos import gateway_pb2, worker_pb2, worker_pb2_grpc
from tests.e2e.conftest import gateway, generate

PAGE = 16


class Watches:
    """The WatchCache streams of several workers, read on threads into one queue of (worker, event)."""

    def __init__(self, ports: list[int]) -> None:
        self.events: queue.Queue[tuple[int, worker_pb2.CacheEvent]] = queue.Queue()
        self.channels = [grpc.insecure_channel(f"127.0.0.1:{p}") for p in ports]
        self.calls = [worker_pb2_grpc.PrefillWorkerStub(ch).WatchCache(worker_pb2.WatchCacheRequest())
                      for ch in self.channels]
        self.threads = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(len(ports))]
        for t in self.threads:
            t.start()

    def _read(self, i: int) -> None:
        try:
            for event in self.calls[i]:
                self.events.put((i, event))
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.CANCELLED:
                raise

    def next(self) -> tuple[int, worker_pb2.CacheEvent]:
        return self.events.get(timeout=60)  # a loaded 2-core machine can take a while per turn

    def stored(self, keys: set[bytes]) -> tuple[set[int], set[bytes]]:
        """Read stored events until all of `keys` were seen: (the workers that stored, every key stored)."""
        workers, seen = set(), set()
        while not keys <= seen:
            i, event = self.next()
            assert not event.reset and not event.removed, event
            workers.add(i)
            seen.update(event.stored)
        return workers, seen

    def close(self) -> None:
        for call in self.calls:
            call.cancel()
        for t in self.threads:
            t.join(5)
        for ch in self.channels:
            ch.close()


def chain(namespace: str, ids: list[int]) -> list[bytes]:
    out, parent = [], root_key(namespace)
    for i in range(len(ids) // PAGE):
        parent = page_key(parent, ids[i * PAGE:(i + 1) * PAGE])
        out.append(parent)
    return out


def test_turns_follow_the_prefill_worker_holding_the_session(launch, tiny_model_dir) -> None:
    # the decode worker's own cache stays on, but it never computes a suffix itself: every turn has a
    # prefill leg, whose worker choice is what this test watches
    cluster = launch(tiny_model_dir, prefill=2, extra_prefill_args=["--chunked-prefill-size", "32"],
                     extra_decode_args=["--decode-local-prefill-tokens", "0"])
    stub = gateway(cluster)
    watches = Watches(cluster.prefill_ports)
    try:
        first_events = dict(watches.next() for _ in range(2))
        assert sorted(first_events) == [0, 1]
        assert all(e.reset and not e.stored and e.page_size == PAGE and e.namespace for e in first_events.values())
        namespace = first_events[0].namespace
        rng = random.Random(7)
        ids = [rng.randrange(700) for _ in range(40)]
        got = generate(stub, ids, max_tokens=6, temperature=0.0, ignore_eos=True)
        assert got.usage.cached_tokens == 0
        # one worker stores the prompt's two full pages, under the key chain the gateway computes
        pages = set(chain(namespace, ids))
        owners, keys = watches.stored(pages)
        assert len(owners) == 1 and keys == pages and len(pages) == 2
        cached = []
        for _ in range(3):  # each turn: the history and the answer, then a new question
            ids = ids + got.tokens + [rng.randrange(700) for _ in range(9)]
            got = generate(stub, ids, max_tokens=6, temperature=0.0, ignore_eos=True)
            cached.append(got.usage.cached_tokens)
            workers, _ = watches.stored(set(chain(namespace, ids)) - pages)
            assert workers == owners, "a later turn was computed by the worker without the history"
            pages |= set(chain(namespace, ids))
        assert cached == [2 * PAGE, 3 * PAGE, 4 * PAGE]  # every page of the previous turn's prompt
        # a routing key: fresh prompts nobody holds go to the key's worker (without one: round robin)
        for key in ("conversation-a", "conversation-b", "conversation-c"):
            where = set()
            for _ in range(2):
                fresh = [rng.randrange(700) for _ in range(40)]
                generate(stub, fresh, max_tokens=2, temperature=0.0, ignore_eos=True,
                         prompt_cache=gateway_pb2.PromptCache(routing_key=key))
                where |= watches.stored(set(chain(namespace, fresh)))[0]
            assert len(where) == 1, f"{key}'s first prompts went to workers {where}"

        with urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{cluster.http_port}/flush_cache",
                                                           method="POST"), timeout=10) as r:
            assert r.status == 200
        resets = dict(watches.next() for _ in range(2))
        assert sorted(resets) == [0, 1] and all(e.reset and not e.stored for e in resets.values())
        again = generate(stub, ids, max_tokens=6, temperature=0.0, ignore_eos=True)
        assert again.usage.cached_tokens == 0 and again.tokens == got.tokens
    finally:
        watches.close()
