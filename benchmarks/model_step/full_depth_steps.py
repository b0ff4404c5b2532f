"""The measurements of bench_full_depth on one built model: decode step, prefill, EAGLE step (random
draft and agreeing draft), each next to its roofline (benchmarks/model_step/roofline.py).

A `Stage` holds the model's runner (KV pool sized at --mem-fraction-static 0.9, CUDA graphs captured
as the decode worker captures them), the pages of up to max(batches) running requests of `context`
tokens and those of one prefill. The requests' KV is random (step costs do not depend on its
values); the requests sample greedily. Times are CUDA-event medians on the GPU, wall-clock medians
on the CPU (the --tiny smoke run).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.model_step.air_model import make_agreeing
from benchmarks.model_step.roofline import (
    Ceilings,
    Part,
    Shape,
    expected_distinct,
    mtp_parts,
    target_parts,
    total,
)
from common import ops
from common.forward.batch import ForwardBatch, SeqSpec
from common.model.config import SpecConfig
from common.model.moe import MoE
from common.runtime.draft import DraftBatch, DraftState
from common.runtime.runner import ModelRunner
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import SamplingParams
from decode_worker.commit import StopRules
from decode_worker.scheduler import DecodeReq, ReqState
from decode_worker.spec.eagle import EagleStepper
from decode_worker.steps import PlainStepper

PAGE = 16


@dataclass(frozen=True)
class Effort:
    """How many repetitions each measurement takes."""

    reps: int  # timed calls of an isolated measurement (after `warmup` untimed ones)
    warmup: int
    b2b_steps: int  # calls per back-to-back run (median of b2b_runs - 1 runs after a warm-up run)
    b2b_runs: int
    agree_steps: int  # timed EAGLE steps with the agreeing draft (after 2 untimed ones)


FULL = Effort(reps=10, warmup=2, b2b_steps=20, b2b_runs=6, agree_steps=8)
TINY = Effort(reps=1, warmup=1, b2b_steps=2, b2b_runs=2, agree_steps=2)


@dataclass
class Stage:
    runner: ModelRunner
    shape: Shape
    ceil: Ceilings | None
    context: int
    spec: tuple[int, int, int]  # (S, k, N)
    effort: Effort
    req_pages: list[list[int]]
    prefill_pages: list[int]
    plain: PlainStepper
    eagle: EagleStepper

    @classmethod
    def build(cls, runner: ModelRunner, shape: Shape, ceil: Ceilings | None, context: int,
              spec: tuple[int, int, int], effort: Effort, pages_per_req: int, max_batch: int, prefill_pages: int) -> Stage:
        first = 1 + max_batch * pages_per_req
        if first + prefill_pages > runner.kv_pool.num_pages:
            raise SystemExit(f"the KV pool holds {runner.kv_pool.num_pages} pages, the benchmark needs "
                             f"{first + prefill_pages}: fewer layers (--layers), batches or context")
        reqs = [list(range(1 + i * pages_per_req, 1 + (i + 1) * pages_per_req)) for i in range(max_batch)]
        fill_kv(runner, first)
        sampler, rules = TokenSampler(SpecialIds(None, None, None, ())), StopRules(())
        return cls(runner, shape, ceil, context, spec, effort, reqs, list(range(first, first + prefill_pages)),
                   PlainStepper(runner, sampler, rules), EagleStepper(runner, sampler, rules, SpecConfig("EAGLE", *spec)))

    @property
    def cuda(self) -> bool:
        return self.runner.device.type == "cuda"

    def floors(self, parts: list[Part]) -> dict[str, float]:
        nbytes, fp8_flops, other_flops = total(parts)
        row = {"bytes_gb": nbytes / 1e9, "fp8_tflop": fp8_flops / 1e12, "other_tflop": other_flops / 1e12}
        if self.ceil is not None:
            row.update(self.ceil.floors(parts))
        return row

    def tokens(self, n: int) -> list[int]:
        return torch.randint(0, self.runner.config.vocab_size, (n,)).tolist()


def fill_kv(runner: ModelRunner, pages: int) -> None:
    """Random K/V in pages [1, pages) of every layer."""
    with torch.no_grad():
        for layer in range(runner.kv_pool.num_layers):
            runner.kv_pool.kv[layer, :, 1:pages].normal_()


# ------------------------------------------------------------------------------------ timing
def _elapsed_us(fn: Callable[[], object], cuda: bool) -> float:
    if not cuda:
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e6
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3


def isolated_us(st: Stage, fn: Callable[[], object], before: Callable[[], object] | None = None,
                reps: int | None = None) -> float:
    """Median of fn() alone from an idle device (before() untimed ahead of each call; warm-up calls first)."""
    times = []
    warmup = st.effort.warmup
    for i in range((reps or st.effort.reps) + warmup):
        if before is not None:
            before()
        if st.cuda:
            torch.cuda.synchronize()
        t = _elapsed_us(fn, st.cuda)
        if i >= warmup:
            times.append(t)
    return statistics.median(times)


def back_to_back_us(st: Stage, fn: Callable[[], object]) -> float:
    """Per call, calls issued back to back (the host work of one hides behind the previous call's device
    work, as in the serving loop); median over runs after a warm-up run."""
    n = st.effort.b2b_steps
    runs = [_elapsed_us(lambda: [fn() for _ in range(n)], st.cuda) / n for _ in range(st.effort.b2b_runs)]
    return statistics.median(runs[1:])


# ------------------------------------------------------------------------------------ expert counts
def routed_experts(model: torch.nn.Module, fn: Callable[[], object]) -> list[tuple[str, int]]:
    """Run fn (eagerly) and return, per MoE call in order, (module name, distinct routed experts its
    tokens picked), from the router's own logits through the same top-k."""
    calls: list[tuple[str, int]] = []
    handles = []
    for name, moe in model.named_modules():
        if isinstance(moe, MoE):
            def hook(_m, _inp, logits, name=name, moe=moe):  # type: ignore[no-untyped-def]
                _, ids = ops.grouped_topk(logits, moe.gate.e_score_correction_bias, moe.top_k, moe.n_group,
                                          moe.topk_group, moe.renormalize, moe.scaling, 0)
                calls.append((name, int(ids.unique().numel())))
            handles.append(moe.gate.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            fn()
    finally:
        for h in handles:
            h.remove()
    return calls


def _eager(runner: ModelRunner, fn: Callable[[], object]) -> Callable[[], object]:
    """fn with the runner's captured graphs off (forward hooks do not run inside a graph replay)."""

    def run() -> None:
        graphs, runner.graphs = runner.graphs, {}
        try:
            fn()
        finally:
            runner.graphs = graphs

    return run


# ------------------------------------------------------------------------------------ decode
def decode(st: Stage, b: int) -> dict:
    """One decode step of b requests at `context` tokens: the forward through the decode graph,
    isolated and back to back, against its roofline (distinct experts from the step's own routing)."""
    runner, ctx, c = st.runner, st.context, st.runner.config
    batch = ForwardBatch.decode(st.tokens(b), [ctx] * b, st.req_pages[:b], PAGE, runner.device)
    distinct = [d for _, d in routed_experts(runner.model, lambda: runner.forward(batch))]

    def step() -> None:  # a graph replay when one was captured
        runner.decode_logits(batch)

    row = {"batch": b, "context": ctx, "graph_us": isolated_us(st, step), "back_to_back_us": back_to_back_us(st, step),
           "distinct_actual": statistics.mean(distinct),
           "distinct_formula": expected_distinct(c.n_routed_experts, c.num_experts_per_tok, b)}
    row.update(st.floors(target_parts(st.shape, b, b * (ctx + 1), b * (ctx + 1), distinct, b)))
    row["measured_us"] = row["back_to_back_us"]
    row["per_layer_us"] = row["measured_us"] / c.num_hidden_layers
    row["tok_s"] = b / row["measured_us"] * 1e6
    return row


# ------------------------------------------------------------------------------------ prefill
def _prefill_forwards(st: Stage, n: int, chunk: int) -> tuple[list[tuple[int, int]], Callable[[bool], None]]:
    """(chunk spans, run(draft)): one sequence of n random prompt tokens on the prefill pages, forwarded in
    chunks of `chunk` as the prefill worker plans them, with the MTP draft extend after each when draft."""
    runner = st.runner
    ids = st.tokens(n + 1)
    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]
    pages = st.prefill_pages[:-(-n // PAGE)]

    def run(draft: bool) -> None:
        for s, e in spans:
            spec = SeqSpec(ids[s:e], range(s, e), e, pages, logit_rows=None if e == n else [])
            batch = ForwardBatch.build([spec], PAGE, runner.device)
            _, hidden = runner.forward(batch)
            if draft:
                nxt = SeqSpec(ids[s + 1:e + 1], range(s, e), e, pages, logit_rows=None if e == n else [])
                runner.draft_forward(ForwardBatch.build([nxt], PAGE, runner.device), hidden)

    return spans, run


def prefill(st: Stage, n: int, chunk: int) -> dict:
    """One sequence of n prompt tokens in chunks of `chunk` (as the prefill worker plans them): the target
    forwards alone, and with the MTP draft extend the prefill worker adds when EAGLE is on."""
    runner, c = st.runner, st.runner.config
    spans, run = _prefill_forwards(st, n, chunk)
    distinct = [d for _, d in routed_experts(runner.model, lambda: run(False))]
    n_moe = c.num_hidden_layers - c.first_k_dense_replace
    parts = []
    for i, (s, e) in enumerate(spans):
        t = e - s
        parts += target_parts(st.shape, t, e, t * s + t * (t + 1) // 2, distinct[i * n_moe:(i + 1) * n_moe],
                              1 if e == n else 0)
    reps = prefill_reps(st)
    retries = _alloc_retries(st)
    row = {"tokens": n, "chunks": len(spans), "measured_us": isolated_us(st, lambda: run(False), reps=reps)}
    row["alloc_retries"] = _alloc_retries(st) - retries
    row |= {"with_draft_us": isolated_us(st, lambda: run(True), reps=reps), "triton_attention_us": None}
    if st.cuda:  # the same forward with the Triton kernel in place of SDPA for long prefills
        from common.attention import triton_paged

        saved, triton_paged.USE_SDPA_PREFILL = triton_paged.USE_SDPA_PREFILL, False
        try:
            row["triton_attention_us"] = isolated_us(st, lambda: run(False), reps=reps)
        finally:
            triton_paged.USE_SDPA_PREFILL = saved
    row.update(st.floors(parts))
    row["tok_s"] = n / row["measured_us"] * 1e6
    return row


def prefill_reps(st: Stage) -> int:
    """Timed repetitions of a prefill (an 8K one of the full model takes ~0.4 s; two were too few to
    settle its median within 4 %)."""
    return max(1, st.effort.reps // 2)


def prefill_target_us(st: Stage, n: int, chunk: int) -> dict:
    """The target forwards of an n-token prompt alone, as `prefill` times them."""
    _, run = _prefill_forwards(st, n, chunk)
    retries = _alloc_retries(st)
    us = isolated_us(st, lambda: run(False), reps=prefill_reps(st))
    return {"tokens": n, "measured_us": us, "alloc_retries": _alloc_retries(st) - retries}


def _alloc_retries(st: Stage) -> int:
    """The caching allocator's count of allocations it could serve only after returning its cached
    blocks to the driver (each a synchronising cudaFree + cudaMalloc): a forward short of memory."""
    return torch.cuda.memory_stats(st.runner.device).get("num_alloc_retries", 0) if st.cuda else 0


# ------------------------------------------------------------------------------------ profile
def profile(st: Stage, batches: list[int], prefill_tokens: int, chunk: int, top: int = 30,
            eagle: bool = False) -> list[str]:
    """Per-kernel GPU time (torch.profiler) of the decode graph replay at each batch (and with `eagle`
    of the EAGLE step there, as the worker runs it) and of an eager prefill of prefill_tokens (0:
    none), as markdown sections: where the gap to the roofline goes."""
    from benchmarks.model_step.profile_step import section

    runner, out = st.runner, []
    for b in batches:
        batch = ForwardBatch.decode(st.tokens(b), [st.context] * b, st.req_pages[:b], PAGE, runner.device)

        def step(batch: ForwardBatch = batch) -> None:
            runner.decode_logits(batch)

        out += section(f"decode B={b}, CUDA graph", isolated_us(st, step), step, st.effort.reps, top)
        if eagle:
            reqs, reset = _requests(st, b)

            def spec_step(reqs: list[DecodeReq] = reqs, reset: Callable[[], None] = reset) -> None:
                reset()  # every profiled step from the same state (host work, outside the kernels' time)
                st.eagle.step(reqs)

            wall = isolated_us(st, lambda reqs=reqs: st.eagle.step(reqs), reset)
            out += section(f"EAGLE {','.join(map(str, st.spec))} B={b}, worker graphs", wall, spec_step,
                           st.effort.reps, top)
    if prefill_tokens:
        _, run = _prefill_forwards(st, prefill_tokens, chunk)

        def target() -> None:
            run(False)

        reps = max(2, st.effort.reps // 4)
        out += section(f"prefill 1x{prefill_tokens}, eager", isolated_us(st, target, reps=reps), target, reps, top)
    return out


def trace(st: Stage, batches: list[int], prefill_tokens: int, chunk: int, out: Path) -> list[str]:
    """Chrome traces (host ops with their Python stacks, kernels, launch links) of one EAGLE step at each
    batch (as the worker runs it, after two untraced steps) and of one prefill of prefill_tokens (0:
    none), gzipped under out: what the host does while the GPU waits. Returns the files' names."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    def write(name: str, fn: Callable[[], object], before: Callable[[], object]) -> str:
        for _ in range(2):
            before()
            fn()
        before()
        torch.cuda.synchronize()
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
            fn()
            torch.cuda.synchronize()
        prof.export_chrome_trace(str(out / f"{name}.json.gz"))  # gzipped by torch for a .gz path
        return f"{name}.json.gz"

    names = []
    for b in batches:
        reqs, reset = _requests(st, b)
        names.append(write(f"trace_eagle_b{b}", lambda reqs=reqs: st.eagle.step(reqs), reset))
    if prefill_tokens:
        _, run = _prefill_forwards(st, prefill_tokens, chunk)
        names.append(write(f"trace_prefill_{prefill_tokens}", lambda: run(False), lambda: None))
    return names


# ------------------------------------------------------------------------------------ EAGLE
def _requests(st: Stage, b: int) -> tuple[list[DecodeReq], Callable[[], None]]:
    """b running requests at `context` tokens (greedy) and a reset() back to that state with a random
    pending token and random draft state each (as after a previous step's extend)."""
    runner, ctx, k = st.runner, st.context, st.spec[1]
    params = SamplingParams(max_tokens=10**6, ignore_eos=True, temperature=0.0)
    reqs = [DecodeReq(f"r{i}", i, [0] * ctx, params, channel=None, state=ReqState.RUNNING) for i in range(b)]
    for r, pages in zip(reqs, st.req_pages):
        r.pages = pages
    pending = st.tokens(b)
    dev, v, h = runner.device, runner.config.vocab_size, runner.config.hidden_size
    top = torch.softmax(torch.randn(b, v, device=dev), -1).topk(k)
    hidden = torch.randn(b, h, device=dev, dtype=runner.dtype)

    def reset() -> None:
        state = DraftBatch(top.values, top.indices, hidden)
        for i, r in enumerate(reqs):
            r.kv_len, r.output_ids, r.finish = ctx, [pending[i]], None
            r.logprobs, r.verify_steps, r.accepted_drafts = [], 0, 0
            r.draft = DraftState.of(state, i)

    reset()
    return reqs, reset


def eagle_parts(st: Stage, b: int, calls: list[tuple[str, int]]) -> list[Part]:
    """Verify (B*N tokens) + S-1 draft steps (B*k tokens each) + the draft extend (B*(S+1) tokens), with the
    distinct experts of each MoE call of one eager step."""
    s, k, n = st.spec
    ctx, w = st.context, s + 1
    target = [d for name, d in calls if not name.startswith("mtp.")]
    draft = [d for name, d in calls if name.startswith("mtp.")]
    parts = target_parts(st.shape, b * n, b * (ctx + n), b * (n * ctx + n * (n + 1) // 2), target, b * n)
    for level in range(s - 1):
        q = level + 1
        parts += mtp_parts(st.shape, b * k, b * (ctx + q * k), b * k * (ctx + q * k), draft[level], b * k)
    return parts + mtp_parts(st.shape, b * w, b * (ctx + w), b * (w * ctx + w * (w + 1) // 2), draft[-1], b)


def eagle(st: Stage, b: int) -> dict:
    """The EAGLE (S,k,N) step against the plain step (both as the decode worker runs them, with its graphs,
    from an idle device), tokens/s at accept lengths 1..S+1, and the step against its bytes roofline."""
    reqs, reset = _requests(st, b)
    calls = routed_experts(st.runner.model, _eager(st.runner, lambda: st.eagle.step(reqs)))
    t_plain = isolated_us(st, lambda: st.plain.step(reqs), reset)
    t_eagle = isolated_us(st, lambda: st.eagle.step(reqs), reset)
    s = st.spec[0]
    row = {"batch": b, "plain_step_us": t_plain, "eagle_step_us": t_eagle, "eagle_over_plain": t_eagle / t_plain,
           "plain_tok_s": b / t_plain * 1e6,
           "eagle_tok_s": {a: b * a / t_eagle * 1e6 for a in range(1, s + 2)}}
    row.update(st.floors(eagle_parts(st, b, calls)))
    row["measured_us"] = t_eagle
    return row


def agreeing(st: Stage, b: int) -> dict:
    """EAGLE steps back to back with the agreeing draft (make_agreeing, applied beforehand): the measured
    accept length and tokens/s."""
    reqs, _ = _requests(st, b)
    for _ in range(2):  # the first step's draft state is random; from the second on it is the draft's own
        st.eagle.step(reqs)
    before = sum(len(r.output_ids) for r in reqs)
    n = st.effort.agree_steps
    t = _elapsed_us(lambda: [st.eagle.step(reqs) for _ in range(n)], st.cuda)
    tokens = sum(len(r.output_ids) for r in reqs) - before
    return {"batch": b, "accept_length": tokens / (n * b), "step_us": t / n,
            "tok_s": tokens / t * 1e6}


def agreeing_all(st: Stage, batches: list[int]) -> list[dict]:
    """make_agreeing on the stage's model (in place: the captured graphs see the new weights), then
    `agreeing` at each batch size. The model is not random any more afterwards."""
    make_agreeing(st.runner.model)
    return [agreeing(st, b) for b in batches]
