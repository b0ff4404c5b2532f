"""Cost of one EAGLE step against one plain decode step, GLM-4.5-Air-shaped layers.

    python3 -m benchmarks.model_step.bench_spec_step [--batches 1,8,32] [--context 1024] [--spec 3,1,4]

Model: Air widths (H 4096, 96/8 heads of 128, 128 experts top-8 of I_e 1408, dense I 10944,
vocab 151552), 4 layers (1 dense + 3 MoE) plus the MTP layer, random bf16 weights. Each of B
requests holds `context` tokens of KV (target and draft). Timed with CUDA events (median):

- plain: one decode step as the decode worker runs it (PlainStepper: batch build, forward,
  processors, sampling, commit) and its bare target forward (runner.decode_logits), each eager and
  replayed through the decode CUDA graphs the worker captures (runner.capture_decode_graphs);
- spec: one EAGLE step (EagleStepper: S-1 draft forwards, verify of N tokens, accept, draft extend)
  and its bare forwards (draft B*k tokens, verify B*N tokens, fixed-shape draft extend B*(S+1)
  tokens), each eager and with the verify, draft-step and extend forwards replayed through the
  graphs the worker captures with EAGLE on (runner.capture_spec_graphs). The requests' draft states
  are rows of one DraftBatch, as after a previous step's extend (the steady state).

The ratio spec/plain is what an accept length must beat: speedup ~ accept_length * plain / spec.
Requests are reset to the same state before every repetition (KV of rejected tokens is scratch).
With OUT set, writes $OUT/bench_spec_step.md.

    python3 -m benchmarks.model_step.bench_spec_step --host-profile [--tiny] [--sampling greedy|seeded|penalty]

Host cost of one EAGLE step (meant for the tiny model on CPU): wall time of EagleStepper.step minus
the time spent inside the model forwards (runner.forward / runner.draft_forward, synchronised on
CUDA), median over --reps; with --cprofile also the top functions outside the forwards.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from math import nan

import torch

from benchmarks import measure
from benchmarks.model_step.air_model import AIR, TINY_WIDTHS, random_model
from common.forward.batch import ForwardBatch, SeqSpec, TreeLayout
from common.model.config import SpecConfig, eagle_step_slots
from common.runtime.cuda_graphs import Forward, GraphSet
from common.runtime.draft import DraftBatch, DraftState
from common.runtime.runner import ModelRunner
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import SamplingParams
from decode_worker.commit import StopRules
from decode_worker.scheduler import DecodeReq, ReqState
from decode_worker.spec.eagle import EagleStepper
from decode_worker.steps import PlainStepper

PAGE = 16
SAMPLING = {
    "greedy": {"temperature": 0.0},
    "seeded": {"temperature": 0.8, "top_p": 0.95, "seed": 1234},
    "penalty": {"temperature": 0.0, "repetition_penalty": 1.1, "frequency_penalty": 0.2},
}


def host_profile(runner: ModelRunner, step, reset, reps: int,  # type: ignore[no-untyped-def]
                 show_functions: bool) -> tuple[float, float, float]:
    """(step wall, time inside the model forwards, host = wall - forwards), medians in us."""
    inside = [0.0]
    cuda = runner.device.type == "cuda"

    def timed(fn):  # type: ignore[no-untyped-def]
        def run(*a, **kw):  # type: ignore[no-untyped-def]
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            if cuda:
                torch.cuda.synchronize()
            inside[0] += time.perf_counter() - t0
            return out
        return run

    runner.forward, runner.draft_forward = timed(runner.forward), timed(runner.draft_forward)  # type: ignore
    try:
        walls, fwds = [], []
        for i in range(reps + 3):
            reset()
            if cuda:
                torch.cuda.synchronize()
            inside[0] = 0.0
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if i >= 3:
                walls.append(time.perf_counter() - t0)
                fwds.append(inside[0])
        if show_functions:
            prof = cProfile.Profile()
            for _ in range(reps):
                reset()
                prof.enable()
                step()
                prof.disable()
            out = io.StringIO()
            # the step's own Python (the forwards' internals left out)
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(
                r"decode_worker|common/forward/batch|common/sampling|common/runtime/(draft|token_sampler|runner|cuda_graphs)", 30)
            print(out.getvalue())
    finally:
        del runner.forward, runner.draft_forward  # back to the class methods
    hosts = [w - f for w, f in zip(walls, fwds)]
    return statistics.median(walls) * 1e6, statistics.median(fwds) * 1e6, statistics.median(hosts) * 1e6


@dataclass
class Setup:
    """What every batch size's measurement shares: the model, its steppers and the captured graphs."""

    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    hidden_size: int
    vocab_size: int
    spec: tuple[int, int, int]  # (S, k, N)
    pages_per_req: int
    runner: ModelRunner
    plain: PlainStepper
    eagle: EagleStepper
    timed: bool  # CUDA event timing (not the host profile, not the CPU smoke run)
    graphs: dict[Forward, GraphSet] = field(default_factory=dict)  # the worker's captures, on per measurement

    def with_graphs(self, fn: Callable[[], None]) -> Callable[[], None]:
        """fn with the captured graphs switched on."""

        def run() -> None:
            self.runner.graphs = self.graphs
            try:
                fn()
            finally:
                self.runner.graphs = {}

        return run


def _setup(args: argparse.Namespace, batches: list[int]) -> Setup:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fields = dict(AIR, **TINY_WIDTHS) if args.tiny else dict(AIR)
    s, k, n = (int(x) for x in args.spec.split(","))
    pages_per_req = -(-(args.context + eagle_step_slots(s, k, n)) // PAGE)
    model = random_model(fields, device, dtype)
    runner = ModelRunner("", device, dtype, PAGE, 1 + max(batches) * pages_per_req, with_mtp=True, model=model)
    sampler, rules = TokenSampler(SpecialIds(None, None, None, ())), StopRules(())
    setup = Setup(args, device, dtype, fields["hidden_size"], fields["vocab_size"], (s, k, n), pages_per_req, runner,
                  PlainStepper(runner, sampler, rules), EagleStepper(runner, sampler, rules, SpecConfig("EAGLE", s, k, n)),
                  device.type == "cuda" and not args.host_profile)
    if setup.timed and not args.no_graphs:  # the worker's captures, up to the largest batch here
        runner.capture_decode_graphs(max(batches))
        runner.capture_spec_graphs(max(batches), s, k, n)
        setup.graphs, runner.graphs = runner.graphs, {}  # eager unless a measurement switches them on
    return setup


def _requests(st: Setup, b: int) -> list[DecodeReq]:
    """b running requests of `context` tokens, their target and draft KV filled once (random context)."""
    ctx, runner = st.args.context, st.runner
    params = SamplingParams(max_tokens=10**6, ignore_eos=True, **SAMPLING[st.args.sampling])
    reqs = []
    for i in range(b):
        r = DecodeReq(f"r{i}", i, list(range(ctx)), params, channel=None, state=ReqState.RUNNING)
        r.pages = list(range(1 + i * st.pages_per_req, 1 + (i + 1) * st.pages_per_req))
        reqs.append(r)
    for r in reqs:
        spec = SeqSpec([int(t) % st.vocab_size for t in r.prompt_ids], range(ctx), ctx, r.pages, logit_rows=[])
        batch = ForwardBatch.build([spec], PAGE, st.device)
        _, h = runner.forward(batch)
        runner.draft_forward(batch, h)
    return reqs


def _batch(st: Setup, b: int) -> tuple | None:
    """One batch size: the host-profile row, None after a CPU smoke run, else the timing row."""
    args, runner, device, dtype, ctx = st.args, st.runner, st.device, st.dtype, st.args.context
    s, k, n = st.spec
    reqs = _requests(st, b)
    topk = torch.softmax(torch.randn(b, st.vocab_size, device=device), -1).topk(k)

    def reset() -> None:
        for r in reqs:
            r.kv_len, r.output_ids, r.finish = ctx, [7], None
            r.logprobs, r.verify_steps, r.accepted_drafts = [], 0, 0
        state = DraftBatch(topk.values, topk.indices, torch.randn(b, st.hidden_size, device=device, dtype=dtype))
        for i, r in enumerate(reqs):
            r.draft = DraftState.of(state, i)

    def plain_step() -> None:
        st.plain.step(reqs)

    def eagle_step() -> None:
        st.eagle.step(reqs)

    def plain_forward() -> None:
        runner.decode_logits(ForwardBatch.decode([7] * b, [ctx] * b, [r.pages for r in reqs], PAGE, device))

    pages = [r.pages for r in reqs]
    chain = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device)).expand(b, n, n)

    def verify_forward() -> None:  # as EagleStepper builds it (tree on the device), graph when switched on
        runner.verify_forward(ForwardBatch.tree(torch.full((b, n), 7, device=device),
                                                torch.arange(n, device=device).expand(b, n), chain, [ctx] * b,
                                                pages, PAGE))

    hid = torch.randn(b * k, st.hidden_size, device=device, dtype=dtype)
    eye = torch.eye(k, dtype=torch.bool, device=device).expand(b, k, k)

    def draft_forward() -> None:  # draft level 0
        runner.draft_step_forward(ForwardBatch.tree(torch.full((b, k), 7, device=device),
                                                    torch.zeros(b, k, dtype=torch.int64, device=device), eye,
                                                    [ctx] * b, pages, PAGE), hid)

    w = s + 1
    ext_hid = torch.randn(b * w, st.hidden_size, device=device, dtype=dtype)
    causal = torch.ones(w, w, dtype=torch.bool, device=device).tril().expand(b, w, w)

    def extend_forward() -> None:  # as EagleStepper builds it (a = 0 everywhere), graph when switched on
        layout = TreeLayout.build([ctx] * b, pages, st.eagle.window, PAGE, device)
        batch = ForwardBatch.tree_in(layout, torch.full((b, w), 7, device=device),
                                     torch.arange(w, device=device).expand(b, w), causal,
                                     logit_rows=torch.arange(b, device=device) * w)
        runner.draft_extend_forward(batch, ext_hid, k)

    if args.host_profile:
        row = (b, *host_profile(runner, eagle_step, reset, args.reps, args.cprofile))
        print(f"B={b}: EAGLE step {row[1]:.0f} us wall, {row[2]:.0f} us in forwards, host {row[3]:.0f} us", flush=True)
        return row
    if not st.timed:
        reset()
        plain_step()
        reset()
        eagle_step()
        extend_forward()
        print(f"B={b}: CPU smoke run ok", flush=True)
        return None

    def us(fn: Callable[[], None], before: Callable[[], None] | None = None, graph: bool = False) -> float:
        """Median µs eager, or through the captured graphs (nan when none were captured)."""
        if graph and st.graphs is None:
            return nan
        return measure.median_event_us(st.with_graphs(fn) if graph else fn, args.reps, before)

    t_plain, t_spec, f_plain = us(plain_step, reset), us(eagle_step, reset), us(plain_forward)
    g_plain, gf_plain = us(plain_step, reset, graph=True), us(plain_forward, graph=True)
    g_spec = us(eagle_step, reset, graph=True)
    f_verify, f_draft = us(verify_forward), us(draft_forward)
    gf_verify, gf_draft = us(verify_forward, graph=True), us(draft_forward, graph=True)
    f_ext, gf_ext = us(extend_forward), us(extend_forward, graph=True)
    print(f"B={b}: plain step eager {t_plain:.0f} us (forward {f_plain:.0f}), graph {g_plain:.0f} us "
          f"(forward {gf_plain:.0f}); EAGLE step eager {t_spec:.0f} us = {t_spec / t_plain:.2f}x eager plain, "
          f"graph {g_spec:.0f} us = {g_spec / g_plain:.2f}x graph plain (draft fwd {f_draft:.0f} eager, "
          f"{gf_draft:.0f} graph, x{s - 1}; verify fwd {f_verify:.0f} eager, {gf_verify:.0f} graph; "
          f"extend fwd {f_ext:.0f} eager, {gf_ext:.0f} graph)", flush=True)
    return (b, t_plain, g_plain, t_spec, g_spec, t_spec / t_plain, g_spec / g_plain, f_plain, gf_plain,
            f_draft, gf_draft, f_verify, gf_verify, f_ext, gf_ext)


def _report(rows: list[tuple], spec: tuple[int, int, int], host_profile: bool) -> None:
    s, k, n = spec
    if host_profile:
        lines = [f"| B | EAGLE ({s},{k},{n}) step wall (us) | in forwards (us) | host (us) |", "|---|---|---|---|"]
        lines += [f"| {b} | {w:.0f} | {f:.0f} | {h:.0f} |" for b, w, f, h in rows]
        print("\n".join(lines))
        return
    head = (f"| B | plain step eager (us) | plain step graph (us) | EAGLE ({s},{k},{n}) step eager (us) | "
            f"EAGLE step graph (us) | EAGLE/plain eager | EAGLE/plain graph | plain fwd eager | "
            f"plain fwd graph | draft fwd eager | draft fwd graph | verify fwd eager ({n} tok/req) | "
            f"verify fwd graph | extend fwd eager ({s + 1} tok/req) | extend fwd graph |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {b} | {tp:.0f} | {gp:.0f} | {ts:.0f} | {gs:.0f} | {r:.2f} | {rg:.2f} | {fp:.0f} | {gfp:.0f} | "
              f"{fd:.0f} | {gfd:.0f} | {fv:.0f} | {gfv:.0f} | {fe:.0f} | {gfe:.0f} |"
              for b, tp, gp, ts, gs, r, rg, fp, gfp, fd, gfd, fv, gfv, fe, gfe in rows]
    text = "\n".join(lines)
    print(text)
    measure.write_out("bench_spec_step.md", text + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--spec", default="3,1,4")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="tiny widths (smoke test on CPU/GPU)")
    ap.add_argument("--no-graphs", action="store_true", help="skip the CUDA-graph plain and EAGLE steps")
    ap.add_argument("--host-profile", action="store_true",
                    help="time the host part of one EAGLE step (step wall time minus the model forwards)")
    ap.add_argument("--cprofile", action="store_true", help="with --host-profile: print the top host functions")
    ap.add_argument("--sampling", choices=SAMPLING, default="greedy", help="the requests' sampling parameters")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    st = _setup(args, batches)
    s, k, n = st.spec
    print(f"device {torch.cuda.get_device_name() if st.device.type == 'cuda' else 'cpu'}, spec (S,k,N)=({s},{k},{n}), "
          f"context {args.context}", flush=True)
    rows = [row for row in (_batch(st, b) for b in batches) if row is not None]
    if rows:
        _report(rows, st.spec, args.host_profile)
    for graphs in st.graphs.values():
        graphs.close()


if __name__ == "__main__":
    with torch.inference_mode():
        main()
