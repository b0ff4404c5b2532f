"""The overlapped plain-decode loop against the synchronous one, on the tiny model (CPU).

On CPU a launched step runs at once, so these tests check the bookkeeping the GPU relies on: the same
tokens and endings for a mixed batch (greedy, seeded sampling, max_tokens, a stop token, a "stop
string" and a deadline, i.e. gateway aborts mid-generation), no wasted row for a max_tokens ending, no
page freed while a launched step may still write it, none leaked, and the synchronous fallback for
a request with a history-dependent processor. The engine is driven turn by turn (`run_once`) by a
fake prefill that computes each prompt's KV into the reserved pages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from common.forward.batch import ForwardBatch, SeqSpec
from common.runtime.runner import ModelRunner
from common.sampling.logit_processors import RowContext
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import SamplingParams
from common.transport.aux import AuxRecord
from common.worker.messages import Wake
from decode_worker.commit import StopRules
from decode_worker.output import ErrorEvent, FinishEvent, TokenEvent
from decode_worker.scheduler import DecodeReq, ReqState, Scheduler
from decode_worker.steps import PlainStepper
from decode_worker.worker import DecodeEngine

PAGE = 4  # small pages: steps cross page boundaries often


class Channel:
    def __init__(self) -> None:
        self.events: list = []

    def put(self, ev) -> None:
        self.events.append(ev)

    @property
    def tokens(self) -> list[int]:
        return [t for ev in self.events if isinstance(ev, TokenEvent) for t in ev.token_ids]

    @property
    def end(self) -> tuple:
        ev = self.events[-1] if self.events else None
        if isinstance(ev, FinishEvent):
            return ("finish", ev.reason, ev.matched_token_id)
        if isinstance(ev, ErrorEvent):
            return ("error", ev.code)
        return ("open",)


class CountingStepper(PlainStepper):
    """Counts the synchronous steps and the rows each request got in launched steps. `strict` (CUDA):
    any device synchronisation inside `launch` raises."""

    def __init__(self, *a, strict: bool = False) -> None:
        super().__init__(*a)
        self.sync_steps = 0
        self.launched: dict[str, int] = {}
        self.strict = strict

    def step(self, reqs):
        self.sync_steps += 1
        return super().step(reqs)

    def launch(self, reqs, prev):
        for r in reqs:
            self.launched[r.request_id] = self.launched.get(r.request_id, 0) + 1
        if not self.strict:
            return super().launch(reqs, prev)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return super().launch(reqs, prev)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@dataclass
class Spec:
    rid: str
    prompt: list[int]
    params: SamplingParams
    arrive: int = 0  # engine turn at which the request is submitted
    abort_after: int | None = None  # the gateway aborts once this many tokens were emitted
    stop_seq: tuple[int, ...] | None = None  # ... or once the emitted tokens end with this ("stop string")
    expire_after: int | None = None  # the deadline passes once this many tokens were emitted
    channel: Channel = field(default_factory=Channel)


@dataclass
class Run:
    out: dict[str, tuple[list[int], tuple]]
    stepper: CountingStepper
    free_before: int
    free_after: int


@pytest.fixture(scope="module")
def env(tiny_model_dir: Path):
    runner = ModelRunner(tiny_model_dir, "cpu", torch.float32, PAGE, 96)
    ids = SpecialIds.from_model_dir(str(tiny_model_dir))
    return runner, ids


def _prefill(runner: ModelRunner, ids: SpecialIds, req: DecodeReq) -> AuxRecord:
    """The prefill worker's part: the prompt's KV into the reserved pages, and the first token."""
    p = req.prompt_ids
    spec = SeqSpec(p, range(len(p)), len(p), req.pages)
    logits, _ = runner.forward(ForwardBatch.build([spec], runner.page_size, runner.device))
    first = TokenSampler(ids).sample(logits, [RowContext(req.params, p, [])])[0].token
    return AuxRecord.build(transfer_id=req.transfer_id, first_token=first, first_logprob=0.0, prompt_len=len(p))


@torch.inference_mode()
def serve(env, specs: list[Spec], overlap: bool, max_running: int = 16, strict: bool = False) -> Run:
    runner, ids = env
    rules = StopRules(ids.eos)
    stepper = CountingStepper(runner, TokenSampler(ids, seed=7), rules, strict=strict)
    sched = Scheduler(runner.allocator, runner.page_size, max_running, max_queued=64, step_slots=1)
    engine = DecodeEngine(sched, stepper, rules, overlap=overlap)
    free_before = runner.allocator.num_free
    specs = [Spec(s.rid, s.prompt, s.params, s.arrive, s.abort_after, s.stop_seq, s.expire_after) for s in specs]
    reqs = {s.rid: DecodeReq(s.rid, i + 1, s.prompt, s.params, s.channel) for i, s in enumerate(specs)}  # type: ignore[arg-type]
    prefilled: set[str] = set()
    held: dict[str, list[int]] = {}  # pages each request held at the end of the previous turn
    for turn in range(400):
        for s in specs:
            if s.arrive == turn:
                sched.submit(reqs[s.rid])
        engine.post(Wake())  # never block on an empty inbox
        engine.run_once()
        for tid, req in list(sched.waiting_kv.items()):
            if req.request_id not in prefilled:
                prefilled.add(req.request_id)
                engine.kv_ready(tid, _prefill(runner, ids, req))
        for s in specs:
            req, got = reqs[s.rid], s.channel.tokens
            if req.state is ReqState.DONE:
                continue
            if s.abort_after is not None and len(got) >= s.abort_after:
                engine.abort(s.rid, "CANCELLED", "aborted by the gateway")
            if s.stop_seq is not None and tuple(got[-len(s.stop_seq):]) == s.stop_seq:
                engine.abort(s.rid, "CANCELLED", "stop string")
            if s.expire_after is not None and len(got) >= s.expire_after:
                req.deadline = time.time() - 1.0
        # a request released while a launched step still holds its row keeps its pages off the free list
        step = engine.in_flight
        free = set(runner.allocator._free)
        for rid, pages in held.items():
            if step is not None and reqs[rid] in step.rows and reqs[rid].state is ReqState.DONE:
                assert not free & set(pages), f"{rid}: pages freed while a launched step may write them"
        held = {rid: list(r.pages) for rid, r in reqs.items() if r.pages}
        if turn > max(s.arrive for s in specs) and not sched.by_id and engine.in_flight is None:
            break
    else:
        raise AssertionError("requests did not finish")
    out = {s.rid: (s.channel.tokens, s.channel.end) for s in specs}
    return Run(out, stepper, free_before, runner.allocator.num_free)


def _prompt(seed: int, n: int) -> list[int]:
    return torch.randint(0, 700, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _greedy(**kw) -> SamplingParams:
    kw.setdefault("ignore_eos", True)
    return SamplingParams(temperature=0.0, **kw)


def test_overlap_matches_sync_on_a_mixed_batch(env) -> None:
    # a first synchronous run finds tokens for the stop token and the "stop string" to hit mid-way
    probe = serve(env, [Spec("p", _prompt(1, 9), _greedy(max_tokens=20)),
                        Spec("q", _prompt(2, 14), _greedy(max_tokens=20))], overlap=False)
    p_out, q_out = probe.out["p"][0], probe.out["q"][0]
    stop_tok = p_out[6]
    first = p_out.index(stop_tok)  # the first occurrence is where generation stops
    assert first >= 2, "the probe's stop token must come mid-generation"
    stop_seq = tuple(q_out[7:9])
    specs = [
        Spec("greedy", _prompt(0, 11), _greedy(max_tokens=17)),
        Spec("stop_token", _prompt(1, 9), _greedy(max_tokens=20, stop_token_ids=(stop_tok,))),
        Spec("stop_string", _prompt(2, 14), _greedy(max_tokens=20), stop_seq=stop_seq),
        Spec("seeded", _prompt(3, 6), SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=1234,
                                                     max_tokens=15, ignore_eos=True), arrive=2),
        Spec("seeded_minp", _prompt(4, 21), SamplingParams(temperature=1.3, min_p=0.05, seed=99, max_tokens=12,
                                                           ignore_eos=True), arrive=5),
        Spec("one_token", _prompt(5, 5), _greedy(max_tokens=1), arrive=3),
        Spec("two_tokens", _prompt(6, 7), _greedy(max_tokens=2), arrive=4),
        Spec("aborted", _prompt(7, 8), _greedy(max_tokens=30), abort_after=5, arrive=1),
        Spec("deadline", _prompt(8, 10), _greedy(max_tokens=30), expire_after=4, arrive=6),
        Spec("eos_allowed", _prompt(9, 12), SamplingParams(temperature=0.0, max_tokens=25), arrive=8),
    ]
    sync = serve(env, specs, overlap=False)
    over = serve(env, specs, overlap=True)
    for s in specs:
        assert over.out[s.rid] == sync.out[s.rid], s.rid
    # the cases really happened
    assert sync.out["stop_token"] == (p_out[:first + 1], ("finish", "stop", stop_tok))
    assert sync.out["stop_string"][0][-2:] == list(stop_seq) and sync.out["stop_string"][1] == ("error", "CANCELLED")
    assert sync.out["aborted"][1] == ("error", "CANCELLED") and len(sync.out["aborted"][0]) == 5
    assert sync.out["deadline"][1] == ("error", "DEADLINE_EXCEEDED") and len(sync.out["deadline"][0]) == 4
    assert sync.out["greedy"][1] == ("finish", "length", None) and len(sync.out["greedy"][0]) == 17
    assert len(sync.out["seeded"][0]) == 15
    assert sync.out["one_token"][1] == sync.out["two_tokens"][1] == ("finish", "length", None)
    # the overlapped run launched every step, and a max_tokens ending wasted no row: decode steps
    # after the prefill's first token are max_tokens - 1
    assert over.stepper.sync_steps == 0 and sum(over.stepper.launched.values()) > 0
    assert over.stepper.launched["greedy"] == 16 and over.stepper.launched["seeded"] == 14
    assert "one_token" not in over.stepper.launched and over.stepper.launched["two_tokens"] == 1
    # a stop-token ending costs at most the one row already launched behind it
    assert over.stepper.launched["stop_token"] in (first, first + 1)
    for run in (sync, over):
        assert run.free_after == run.free_before, "KV pages leaked"


def test_overlap_matches_reference_generation(env) -> None:
    """Greedy through the overlapped engine equals the single-request reference, requests joining late."""
    from common.tools.generate import reference_generate

    runner, ids = env
    specs = [Spec(f"r{i}", _prompt(20 + i, 5 + 3 * i), _greedy(max_tokens=8 + 2 * i), arrive=i) for i in range(5)]
    over = serve(env, specs, overlap=True)
    for s in specs:
        want = reference_generate(runner, TokenSampler(ids), s.prompt, s.params)
        assert over.out[s.rid] == (want, ("finish", "length", None)), s.rid
    assert over.free_after == over.free_before


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, repetition_penalty=1.3, max_tokens=12, ignore_eos=True),
    SamplingParams(temperature=0.7, seed=5, frequency_penalty=0.5, presence_penalty=0.3, max_tokens=12,
                   ignore_eos=True),
], ids=["repetition", "frequency_presence"])
def test_history_dependent_processor_falls_back_to_sync(env, params) -> None:
    specs = [Spec("plain", _prompt(30, 9), _greedy(max_tokens=16)),
             Spec("penalised", _prompt(31, 7), params, arrive=3)]
    sync = serve(env, specs, overlap=False)
    over = serve(env, specs, overlap=True)
    assert over.out == sync.out
    assert over.out["penalised"][1] == ("finish", "length", None) and len(over.out["penalised"][0]) == 12
    # overlap before the penalised request joins and after it leaves, synchronous while it runs
    assert over.stepper.sync_steps >= 11 - 1 and over.stepper.launched.get("plain", 0) >= 2
    assert "penalised" not in over.stepper.launched
    assert over.free_after == over.free_before


def test_thinking_budget_overlaps_until_a_force_is_possible(env) -> None:
    """A request thinking under a budget is launched while no token can be forced yet (whatever the
    token in flight), takes the synchronous step from then on, and gets exactly the synchronous run's
    tokens: the newline and </think> forced at the budget."""
    _, ids = env
    budget = 6
    specs = [Spec("plain", _prompt(50, 9), _greedy(max_tokens=16)),
             Spec("think", _prompt(51, 7) + [ids.think_start], _greedy(max_tokens=14, thinking_budget=budget))]
    sync = serve(env, specs, overlap=False)
    over = serve(env, specs, overlap=True)
    assert over.out == sync.out
    toks = over.out["think"][0]
    if ids.think_end not in toks[:budget]:  # the random model did not close the block itself
        assert toks[budget:budget + 2] in ([ids.newline, ids.think_end], [ids.think_end, toks[budget + 1]])
    assert over.stepper.launched.get("think", 0) >= 2  # overlapped far from the budget
    assert over.stepper.sync_steps >= 2  # and synchronous where a force was possible
    assert over.free_after == over.free_before


def test_min_tokens_and_logprobs_take_the_sync_step_only_while_needed(env) -> None:
    specs = [Spec("min", _prompt(40, 8), SamplingParams(temperature=0.0, min_tokens=4, max_tokens=14)),
             Spec("lp", _prompt(41, 6), _greedy(max_tokens=5, logprobs=True, top_logprobs=2), arrive=9)]
    sync = serve(env, specs, overlap=False)
    over = serve(env, specs, overlap=True)
    assert over.out == sync.out
    # min_tokens masks stop ids for output positions < 4 only: later steps are launched
    assert over.stepper.launched.get("min", 0) > 0 and "lp" not in over.stepper.launched
    assert over.free_after == over.free_before


def test_pool_pressure_falls_back_and_resumes_exactly(env, tiny_model_dir: Path, caplog) -> None:
    """A pool too small for every request: growth that would retract takes the synchronous step (the
    step in flight commits first), and retracted requests resume with the reference tokens."""
    from common.tools.generate import reference_generate

    _, ids = env
    small = ModelRunner(tiny_model_dir, "cpu", torch.float32, PAGE, 16)  # 15 usable pages = 60 slots
    specs = [Spec(f"r{i}", _prompt(50 + i, 10), _greedy(max_tokens=24)) for i in range(3)]
    with caplog.at_level("WARNING", logger="decode_worker.worker"):
        over = serve((small, ids), specs, overlap=True)
    assert "retracted" in caplog.text, "the pool never ran out: the test did not exercise retraction"
    sync = serve((small, ids), specs, overlap=False)
    assert over.out == sync.out
    ref_runner, _ = env
    for s in specs:
        assert over.out[s.rid][0] == reference_generate(ref_runner, TokenSampler(ids), s.prompt, s.params), s.rid
    assert over.stepper.sync_steps > 0 and sum(over.stepper.launched.values()) > 0
    assert over.free_after == over.free_before == small.allocator.num_total


def test_fence_parks_released_pages_until_lifted() -> None:
    from common.kvcache.allocator import PageAllocator

    alloc = PageAllocator(9)
    sched = Scheduler(alloc, PAGE, 4, 4, 1)
    a, b = (DecodeReq(n, i, [1, 2, 3], SamplingParams(max_tokens=4), None) for i, n in enumerate("ab"))  # type: ignore[arg-type]
    for r in (a, b):
        sched.submit(r)
    sched.admit()
    first = sched.raise_fence()
    sched.release(a)
    assert alloc.num_free == 6 and first == [1]
    second = sched.raise_fence()  # a newer step launched: later releases wait for it
    sched.release(b)
    sched.lift_fence(first)
    assert alloc.num_free == 7 and second == [2]
    sched.lift_fence(second)
    assert alloc.num_free == 8
    c = DecodeReq("c", 9, [1], SamplingParams(max_tokens=4), None)  # type: ignore[arg-type]
    sched.submit(c)
    sched.admit()
    sched.release(c)  # no fence up: freed at once
    assert alloc.num_free == 8
