"""The decode engine's messages and published snapshot, on CPU with a fake stepper (no model): what
each message does to a request, that a message nobody handles is refused, and that the load the
event loop reads is what the engine published."""

from __future__ import annotations

import asyncio
import time

import pytest

from common.kvcache.allocator import PageAllocator
from common.kvcache.prefix_index import PrefixCache
from common.serving.sampling_params import SamplingParams
from common.transport.aux import AuxRecord
from common.worker.dispatch import UnknownMessageError
from common.worker.load import WorkerLoadFigures
from common.worker.messages import Wake
from decode_worker.commit import StopRules, commit_tokens
from decode_worker.output import ErrorEvent, FinishEvent, TokenEvent
from decode_worker.scheduler import DecodeReq, QueueFullError, ReqState, Scheduler
from decode_worker.worker import DecodeEngine

PAGE = 4
EOS = 2


class Channel:
    def __init__(self) -> None:
        self.events: list = []

    def put(self, ev) -> None:
        self.events.append(ev)


class FakeStepper:
    """Each step feeds the pending token and commits pending + 1."""

    def __init__(self, rules: StopRules) -> None:
        self.rules = rules
        self.arrived: list[str] = []

    def step(self, reqs: list[DecodeReq]) -> None:
        for r in reqs:
            r.kv_len += 1
            commit_tokens(r, [r.pending + 1], self.rules)

    def on_kv_arrival(self, req: DecodeReq, aux: AuxRecord) -> None:
        self.arrived.append(req.request_id)

    def recompute(self, req: DecodeReq) -> None:
        req.kv_len = req.prompt_len + len(req.output_ids) - 1

    def prefill_local(self, req: DecodeReq) -> None:
        """The prompt's uncached suffix computed here; the first token is the last prompt token + 1."""
        self.arrived.append(f"local:{req.request_id}:{req.cached_len}")
        req.kv_len = req.prompt_len
        commit_tokens(req, [req.prompt_ids[-1] + 1], self.rules)


class Sink:
    def __init__(self) -> None:
        self.expected: dict[int, list[int]] = {}
        self.withdrawn: list[int] = []

    def expect(self, transfer_id: int, pages: list[int], cached_tokens: int = 0) -> None:
        self.expected[transfer_id] = list(pages)

    def withdraw(self, transfer_id: int) -> None:
        self.withdrawn.append(transfer_id)


def make_engine(num_pages: int = 17, max_queued: int = 8, local: int | None = None) -> tuple[DecodeEngine, Sink,
                                                                                             PageAllocator]:
    """local: a prefix cache on, computing suffixes up to this long here (None: no cache)."""
    alloc = PageAllocator(num_pages)
    cache = PrefixCache(alloc, PAGE) if local is not None else None
    sched = Scheduler(alloc, PAGE, max_running=4, max_queued=max_queued, step_slots=1, cache=cache,
                      local_prefill_tokens=local or 0)
    rules = StopRules([EOS])
    engine = DecodeEngine(sched, FakeStepper(rules), rules)
    sink = Sink()
    engine.reservations.sink = sink
    return engine, sink, alloc


def req(rid: str, tid: int, prompt: int = 6, **params) -> DecodeReq:
    params.setdefault("max_tokens", 3)
    return DecodeReq(rid, tid, list(range(10, 10 + prompt)), SamplingParams(**params), Channel())  # type: ignore[arg-type]


def turn(engine: DecodeEngine) -> None:
    engine.post(Wake())  # a turn never waits on an empty inbox
    engine.run_once()


async def submit(engine: DecodeEngine, r: DecodeReq) -> None:
    admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    engine.submit(r, admitted)
    turn(engine)
    await admitted


def aux(tid: int, first: int) -> AuxRecord:
    return AuxRecord.build(transfer_id=tid, first_token=first, first_logprob=0.0, prompt_len=6)


def test_a_request_through_every_message_and_the_published_load() -> None:
    engine, sink, alloc = make_engine()
    total = alloc.num_total

    async def main() -> None:
        r = req("a", 11)
        await submit(engine, r)  # the same turn admits it: 2 pages for 6 + 1 slots
        assert r.state is ReqState.WAITING_KV and sink.expected == {11: r.pages}
        assert engine.snapshot.load == WorkerLoadFigures(0, 0, 1, total - 2, total)
        assert await engine.wait_reserved(11, timeout=1.0)
        engine.kv_ready(11, aux(11, first=40))
        turn(engine)  # first token committed, then one step
        assert engine.stepper.arrived == ["a"]
        assert engine.snapshot.load.running == 1 and engine.snapshot.busy
        turn(engine)
        assert [t for ev in r.channel.events if isinstance(ev, TokenEvent) for t in ev.token_ids] == [40, 41, 42]
        assert isinstance(r.channel.events[-1], FinishEvent) and r.channel.events[-1].reason == "length"
        assert r.state is ReqState.DONE and sink.withdrawn == [11]
        assert engine.snapshot.load == WorkerLoadFigures(0, 0, 0, total, total) and not engine.snapshot.busy

    asyncio.run(main())


def test_refused_submits_reject_the_admitted_future() -> None:
    engine, _, _ = make_engine(num_pages=3, max_queued=1)  # 2 pages: one request fits

    async def main() -> None:
        await submit(engine, req("a", 1))
        await submit(engine, req("b", 2))  # queued for memory
        with pytest.raises(QueueFullError):
            await submit(engine, req("c", 3))
        with pytest.raises(ValueError, match="already active"):
            await submit(engine, req("a", 4))
        assert engine.snapshot.load.queued == 1 and engine.snapshot.load.waiting_for_kv == 1

    asyncio.run(main())


@pytest.mark.parametrize("how", ["abort", "kv_failed", "deadline"])
def test_a_request_ended_early_gets_its_error_and_frees_its_pages(how: str) -> None:
    engine, sink, alloc = make_engine()

    async def main() -> DecodeReq:
        r = req("a", 5)
        await submit(engine, r)
        if how == "abort":
            engine.abort("a", "CANCELLED", "aborted by the gateway")
        elif how == "kv_failed":
            engine.kv_failed(5, "peer gone")
        else:
            r.deadline = time.time() - 1
        turn(engine)
        return r

    r = asyncio.run(main())
    code = {"abort": "CANCELLED", "kv_failed": "UNAVAILABLE", "deadline": "DEADLINE_EXCEEDED"}[how]
    assert r.channel.events == [ErrorEvent(code, r.channel.events[0].message)]
    assert r.state is ReqState.DONE and sink.withdrawn == [5]
    assert alloc.num_free == alloc.num_total == engine.snapshot.load.free_pages


def test_kv_for_an_unknown_transfer_is_dropped(caplog: pytest.LogCaptureFixture) -> None:
    engine, _, _ = make_engine()
    engine.kv_ready(99, aux(99, first=5))
    with caplog.at_level("WARNING"):
        turn(engine)
    assert "unknown or aborted transfer 99" in caplog.text


def test_the_first_token_may_finish_the_request() -> None:
    engine, sink, _ = make_engine()

    async def main() -> DecodeReq:
        r = req("a", 6, max_tokens=8)
        await submit(engine, r)
        engine.kv_ready(6, aux(6, first=EOS))
        turn(engine)
        return r

    r = asyncio.run(main())
    assert [type(ev) for ev in r.channel.events] == [TokenEvent, FinishEvent]
    assert r.channel.events[-1].matched_token_id == EOS and sink.withdrawn == [6]


def test_a_message_the_decode_engine_does_not_handle_is_refused() -> None:
    from prefill_worker.messages import Abort as PrefillAbort

    engine, _, _ = make_engine()
    with pytest.raises(UnknownMessageError, match="DecodeEngine.*prefill_worker.messages.Abort"):
        engine.post(PrefillAbort("a", "why"))  # type: ignore[arg-type]


def test_a_step_that_does_not_return_shows_as_a_stall() -> None:
    """The engine publishes its work in hand before the step: the event loop sees the stall of a step
    that hangs, even when the engine was idle until the request came."""
    import threading

    engine, _, _ = make_engine()
    release = threading.Event()
    inner = engine.stepper.step
    engine.stepper.step = lambda reqs: (release.wait(10), inner(reqs))  # type: ignore[method-assign]

    async def main() -> bool:
        engine.start()
        try:
            r = req("a", 1, max_tokens=2)
            admitted: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            engine.submit(r, admitted)
            await admitted
            await asyncio.sleep(0.1)
            assert not engine.stalled(0.2), "idle until the KV arrives"
            engine.kv_ready(1, aux(1, first=30))
            deadline = time.monotonic() + 5
            while not engine.stalled(0.2):
                assert time.monotonic() < deadline, "the hanging step never showed as a stall"
                await asyncio.sleep(0.02)
            release.set()
            while engine.stalled(0.2):
                assert time.monotonic() < deadline + 5, "the stall did not clear"
                await asyncio.sleep(0.02)
            return isinstance(r.channel.events[-1], FinishEvent)
        finally:
            release.set()
            engine.stop(5)

    assert asyncio.run(main())


def test_an_abort_for_one_call_leaves_another_call_with_the_same_id_alone() -> None:
    """A refused duplicate (or a call cancelled before admission) aborts only its own request object."""
    engine, _, alloc = make_engine()

    async def main() -> tuple[DecodeReq, DecodeReq]:
        first, dup = req("a", 7), req("a", 8)
        await submit(engine, first)
        with pytest.raises(ValueError, match="already"):
            await submit(engine, dup)
        engine.abort("a", "CANCELLED", "client cancelled", only=dup)
        turn(engine)
        assert first.channel.events == [] and first.state is ReqState.WAITING_KV
        engine.abort("a", "CANCELLED", "client cancelled", only=first)
        turn(engine)
        return first, dup

    first, _ = asyncio.run(main())
    assert first.channel.events == [ErrorEvent("CANCELLED", "client cancelled")]
    assert alloc.num_free == alloc.num_total


def test_a_cached_prefix_is_answered_and_a_short_suffix_is_computed_here() -> None:
    engine, sink, alloc = make_engine(local=2)
    total = alloc.num_total

    def tokens(r: DecodeReq) -> list[int]:
        return [t for ev in r.channel.events if isinstance(ev, TokenEvent) for t in ev.token_ids]

    async def main() -> None:
        a = req("a", 1, max_tokens=4)  # prompt 10..15, outputs 40..43: KV of 9 tokens, 2 pages kept
        await submit(engine, a)
        engine.kv_ready(1, aux(1, first=40))
        for _ in range(3):
            turn(engine)
        assert tokens(a) == [40, 41, 42, 43] and a.state is ReqState.DONE
        history = a.prompt_ids + a.output_ids
        far = DecodeReq("far", 2, history + [7, 8, 9], SamplingParams(max_tokens=2), Channel())  # type: ignore[arg-type]
        await submit(engine, far)  # 8 cached, 5 uncached (> 2): the prefill worker sends the rest
        answer = await engine.wait_reserved(2, timeout=1.0)
        assert (answer.cached_tokens, answer.decode_computes) == (8, False) and sink.expected[2] == far.pages
        near = DecodeReq("near", 3, history[:9] + [7], SamplingParams(max_tokens=2), Channel())  # type: ignore[arg-type]
        await submit(engine, near)  # 8 cached, 2 uncached: computed here, no KV expected
        answer = await engine.wait_reserved(3, timeout=1.0)
        assert (answer.cached_tokens, answer.decode_computes) == (8, True) and 3 not in sink.expected
        assert engine.stepper.arrived[-1] == "local:near:8"
        turn(engine)
        assert tokens(near) == [8, 9] and near.state is ReqState.DONE  # the first token in the stream
        alone = DecodeReq("alone", 4, [1, 2, 3], SamplingParams(max_tokens=1), Channel(),  # type: ignore[arg-type]
                          local_prefill=True)
        await submit(engine, alone)  # no prefill leg: computed here and finished by its first token
        assert tokens(alone) == [4] and isinstance(alone.channel.events[-1], FinishEvent)
        engine.abort("far")
        turn(engine)
        assert engine.snapshot.load == WorkerLoadFigures(0, 0, 0, total, total)
        freed: list[int] = []
        engine.flush_cache(freed.append)
        turn(engine)
        assert freed and freed[0] > 0 and alloc.num_free == total

    asyncio.run(main())
