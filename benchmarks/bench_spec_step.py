"""Cost of one EAGLE step against one plain decode step, GLM-4.5-Air-shaped layers.

    python benchmarks/bench_spec_step.py [--batches 1,8,32] [--context 1024] [--spec 3,1,4]

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

    python benchmarks/bench_spec_step.py --host-profile [--tiny] [--sampling greedy|seeded|penalty]

Host cost of one EAGLE step (meant for the tiny model on CPU): wall time of EagleStepper.step minus
the time spent inside the model forwards (runner.forward / runner.draft_forward, synchronised on
CUDA), median over --reps; with --cprofile also the top functions outside the forwards.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from math import nan
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

from common.forward.batch import ForwardBatch, SeqSpec, TreeLayout
from common.model.config import ModelConfig, SpecConfig, eagle_step_slots
from common.model import build_model
from common.runtime.draft import DraftBatch, DraftState
from common.runtime.runner import ModelRunner
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import SamplingParams
from decode_worker.commit import StopRules
from decode_worker.scheduler import DecodeReq, ReqState
from decode_worker.spec.eagle import EagleStepper
from decode_worker.steps import PlainStepper

AIR = {
    "architectures": ["Glm4MoeForCausalLM"], "model_type": "glm4_moe", "vocab_size": 151552, "hidden_size": 4096,
    "intermediate_size": 10944, "moe_intermediate_size": 1408, "num_hidden_layers": 4, "num_attention_heads": 96,
    "num_key_value_heads": 8, "head_dim": 128, "partial_rotary_factor": 0.5, "rope_theta": 1e6,
    "rms_norm_eps": 1e-5, "attention_bias": True, "use_qk_norm": False, "n_routed_experts": 128,
    "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.0, "norm_topk_prob": True, "max_position_embeddings": 16384,
    "num_nextn_predict_layers": 1, "tie_word_embeddings": False,
}
PAGE = 16
SAMPLING = {
    "greedy": {"temperature": 0.0},
    "seeded": {"temperature": 0.8, "top_p": 0.95, "seed": 1234},
    "penalty": {"temperature": 0.0, "repetition_penalty": 1.1, "frequency_penalty": 0.2},
}


def random_model(fields: dict, device: torch.device, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    config = ModelConfig.from_dict(fields)
    model = build_model(config, device, dtype, with_mtp=True)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "norm" in name.split(".")[-2]:
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.normal_(0.0, (1.0 / p.shape[-1]) ** 0.5, generator=gen)
    return model


class Timer:
    def __init__(self) -> None:
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def median_us(self, fn, reps: int, before=None) -> float:  # type: ignore[no-untyped-def]
        for _ in range(3):
            if before:
                before()
            fn()
        times = []
        for _ in range(reps):
            if before:
                before()
            torch.cuda.synchronize()
            self.start.record()
            fn()
            self.end.record()
            self.end.synchronize()
            times.append(self.start.elapsed_time(self.end) * 1000)
        return statistics.median(times)


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
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    fields = dict(AIR)
    if args.tiny:
        fields.update(vocab_size=512, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32, n_routed_experts=16)
    s, k, n = (int(x) for x in args.spec.split(","))
    batches = [int(b) for b in args.batches.split(",")]
    ctx = args.context
    step_slots = eagle_step_slots(s, k, n)
    pages_per_req = -(-(ctx + step_slots) // PAGE)
    model = random_model(fields, device, dtype)
    runner = ModelRunner("", device, dtype, PAGE, 1 + max(batches) * pages_per_req, with_mtp=True, model=model)
    ids = SpecialIds(None, None, None, ())
    sampler, rules = TokenSampler(ids), StopRules(())
    plain = PlainStepper(runner, sampler, rules)
    eagle = EagleStepper(runner, sampler, rules, SpecConfig("EAGLE", s, k, n))
    timer = Timer() if device.type == "cuda" and not args.host_profile else None
    graphs = {}
    if timer is not None and not args.no_graphs:  # the worker's captures, up to the largest batch here
        runner.capture_decode_graphs(max(batches))
        runner.capture_spec_graphs(max(batches), s, k, n)
        graphs, runner.graphs = runner.graphs, {}  # eager unless a measurement switches them on
    hidden_size = fields["hidden_size"]
    rows = []
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, spec (S,k,N)=({s},{k},{n}), "
          f"context {ctx}", flush=True)
    for b in batches:
        params = SamplingParams(max_tokens=10**6, ignore_eos=True, **SAMPLING[args.sampling])
        reqs = []
        for i in range(b):
            r = DecodeReq(f"r{i}", i, list(range(ctx)), params, channel=None, state=ReqState.RUNNING)
            r.pages = list(range(1 + i * pages_per_req, 1 + (i + 1) * pages_per_req))
            reqs.append(r)
        # fill target + draft KV of every request once (random context)
        for r in reqs:
            spec = SeqSpec([int(t) % fields["vocab_size"] for t in r.prompt_ids], range(ctx), ctx, r.pages,
                           logit_rows=[])
            batch = ForwardBatch.build([spec], PAGE, device)
            _, h = runner.forward(batch)
            runner.draft_forward(batch, h)
        topk = torch.softmax(torch.randn(b, fields["vocab_size"], device=device), -1).topk(k)

        def reset() -> None:
            for i, r in enumerate(reqs):
                r.kv_len, r.output_ids, r.finish = ctx, [7], None
                r.logprobs, r.verify_steps, r.accepted_drafts = [], 0, 0
            state = DraftBatch(topk.values, topk.indices, torch.randn(b, hidden_size, device=device, dtype=dtype))
            for i, r in enumerate(reqs):
                r.draft = DraftState.of(state, i)

        def plain_forward() -> None:
            runner.decode_logits(ForwardBatch.decode([7] * b, [ctx] * b, [r.pages for r in reqs], PAGE, device))

        def with_graphs(fn):  # type: ignore[no-untyped-def]
            def run() -> None:
                runner.graphs = graphs
                try:
                    fn()
                finally:
                    runner.graphs = {}
            return run

        pages = [r.pages for r in reqs]
        chain = torch.tril(torch.ones(n, n, dtype=torch.bool, device=device)).expand(b, n, n)

        def verify_forward() -> None:  # as EagleStepper builds it (tree on the device), graph when switched on
            runner.verify_forward(ForwardBatch.tree(torch.full((b, n), 7, device=device),
                                                    torch.arange(n, device=device).expand(b, n), chain, [ctx] * b,
                                                    pages, PAGE))

        hid = torch.randn(b * k, hidden_size, device=device, dtype=dtype)
        eye = torch.eye(k, dtype=torch.bool, device=device).expand(b, k, k)

        def draft_forward() -> None:  # draft level 0
            runner.draft_step_forward(ForwardBatch.tree(torch.full((b, k), 7, device=device),
                                                        torch.zeros(b, k, dtype=torch.int64, device=device), eye,
                                                        [ctx] * b, pages, PAGE), hid)

        w = s + 1
        ext_hid = torch.randn(b * w, hidden_size, device=device, dtype=dtype)
        causal = torch.ones(w, w, dtype=torch.bool, device=device).tril().expand(b, w, w)

        def extend_forward() -> None:  # as EagleStepper builds it (a = 0 everywhere), graph when switched on
            layout = TreeLayout.build([ctx] * b, pages, eagle.window, PAGE, device)
            batch = ForwardBatch.tree_in(layout, torch.full((b, w), 7, device=device),
                                         torch.arange(w, device=device).expand(b, w), causal,
                                         logit_rows=torch.arange(b, device=device) * w)
            runner.draft_extend_forward(batch, ext_hid, k)

        if args.host_profile:
            rows.append((b, *host_profile(runner, lambda: eagle.step(reqs), reset, args.reps, args.cprofile)))
            print(f"B={b}: EAGLE step {rows[-1][1]:.0f} us wall, {rows[-1][2]:.0f} us in forwards, "
                  f"host {rows[-1][3]:.0f} us", flush=True)
            continue
        if timer is None:
            reset()
            plain.step(reqs)
            reset()
            eagle.step(reqs)
            extend_forward()
            print(f"B={b}: CPU smoke run ok", flush=True)
            continue
        t_plain = timer.median_us(lambda: plain.step(reqs), args.reps, before=reset)
        t_spec = timer.median_us(lambda: eagle.step(reqs), args.reps, before=reset)
        f_plain = timer.median_us(plain_forward, args.reps)
        g_plain = timer.median_us(with_graphs(lambda: plain.step(reqs)), args.reps, before=reset) if graphs else nan
        gf_plain = timer.median_us(with_graphs(plain_forward), args.reps) if graphs else nan
        g_spec = timer.median_us(with_graphs(lambda: eagle.step(reqs)), args.reps, before=reset) if graphs else nan
        f_verify = timer.median_us(verify_forward, args.reps)
        f_draft = timer.median_us(draft_forward, args.reps)
        gf_verify = timer.median_us(with_graphs(verify_forward), args.reps) if graphs else nan
        gf_draft = timer.median_us(with_graphs(draft_forward), args.reps) if graphs else nan
        f_ext = timer.median_us(extend_forward, args.reps)
        gf_ext = timer.median_us(with_graphs(extend_forward), args.reps) if graphs else nan
        row = (b, t_plain, g_plain, t_spec, g_spec, t_spec / t_plain, g_spec / g_plain, f_plain, gf_plain,
               f_draft, gf_draft, f_verify, gf_verify, f_ext, gf_ext)
        rows.append(row)
        print(f"B={b}: plain step eager {t_plain:.0f} us (forward {f_plain:.0f}), graph {g_plain:.0f} us "
              f"(forward {gf_plain:.0f}); EAGLE step eager {t_spec:.0f} us = {t_spec / t_plain:.2f}x eager plain, "
              f"graph {g_spec:.0f} us = {g_spec / g_plain:.2f}x graph plain (draft fwd {f_draft:.0f} eager, "
              f"{gf_draft:.0f} graph, x{s - 1}; verify fwd {f_verify:.0f} eager, {gf_verify:.0f} graph; "
              f"extend fwd {f_ext:.0f} eager, {gf_ext:.0f} graph)", flush=True)
    if rows and args.host_profile:
        lines = [f"| B | EAGLE ({s},{k},{n}) step wall (us) | in forwards (us) | host (us) |", "|---|---|---|---|"]
        lines += [f"| {b} | {w:.0f} | {f:.0f} | {h:.0f} |" for b, w, f, h in rows]
        print("\n".join(lines))
    elif rows:
        lines = [f"| B | plain step eager (us) | plain step graph (us) | EAGLE ({s},{k},{n}) step eager (us) | "
                 f"EAGLE step graph (us) | EAGLE/plain eager | EAGLE/plain graph | plain fwd eager | "
                 f"plain fwd graph | draft fwd eager | draft fwd graph | verify fwd eager ({n} tok/req) | "
                 f"verify fwd graph | extend fwd eager ({s + 1} tok/req) | extend fwd graph |",
                 "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {b} | {tp:.0f} | {gp:.0f} | {ts:.0f} | {gs:.0f} | {r:.2f} | {rg:.2f} | {fp:.0f} | {gfp:.0f} | "
                  f"{fd:.0f} | {gfd:.0f} | {fv:.0f} | {gfv:.0f} | {fe:.0f} | {gfe:.0f} |"
                  for b, tp, gp, ts, gs, r, rg, fp, gfp, fd, gfd, fv, gfv, fe, gfe in rows]
        text = "\n".join(lines)
        print(text)
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], "bench_spec_step.md").write_text(text + "\n")
    for g in graphs.values():
        g.close()


if __name__ == "__main__":
    with torch.inference_mode():
        main()
