"""Where the time of one forward goes: per-kernel GPU time of the 4-layer Air-shaped model.

    python3 -m benchmarks.model_step.profile_step [--decode 1,32] [--context 1024] [--prefill 2048]

Random bf16 weights (benchmarks.model_step.air_model's Air widths, no MTP). For each
decode batch size: the eager step and the CUDA-graph replay (GraphRunner, as the decode worker
captures it) under torch.profiler; for the prefill: the eager forward. Prints, per case, the
wall time per step (CUDA events), the summed kernel time, the gap (wall - kernels: launch
latency and idle time between kernels) and the kernels grouped by name with count and total
time per step, largest first. With OUT set, writes $OUT/profile_step.md.
"""

from __future__ import annotations

import argparse
import itertools
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from benchmarks import measure
from benchmarks.model_step.air_model import AIR, random_model
from common.forward.batch import ForwardBatch, SeqSpec
from common.runtime.runner import ModelRunner

PAGE = 16


def kernel_table(fn, reps: int) -> tuple[float, list[tuple[str, int, float]], list[tuple[float, str, str]]]:  # type: ignore[no-untyped-def]
    """(summed kernel µs per call, [(kernel name, launches per call, µs per call)], the idle gaps
    between consecutive kernels of the last call [(µs, kernel before, kernel after)], largest first)."""
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
            torch.cuda.synchronize()  # calls apart: the last call's gaps are its own
    by_name: dict[str, list[float]] = defaultdict(list)
    spans = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            name = ev.name
            if name.startswith(("Memcpy", "Memset")) or "Memcpy" in name:
                name = "[" + name.split()[0] + "]"
            by_name[name].append(ev.device_time)
            spans.append((ev.time_range.start, ev.time_range.end, name[:60]))
    rows = [(n[:90], round(len(ts) / reps), sum(ts) / reps) for n, ts in by_name.items()]
    rows.sort(key=lambda r: -r[2])
    spans.sort()
    per_call = len(spans) // reps
    last = spans[-per_call:] if per_call else []
    gaps = [(b[0] - a[1], a[2], b[2]) for a, b in itertools.pairwise(last) if b[0] > a[1]]
    gaps.sort(key=lambda g: -g[0])
    return sum(r[2] for r in rows), rows, gaps


def section(title: str, wall: float, fn, reps: int, top: int) -> list[str]:  # type: ignore[no-untyped-def]
    total, rows, gaps = kernel_table(fn, reps)
    n_kernels = sum(r[1] for r in rows)
    lines = [f"### {title}", "",
             (f"wall {wall:.0f} µs per step; kernels {total:.0f} µs in {n_kernels} launches; "
              f"gap (wall - kernels) {wall - total:.0f} µs"), "",
             "| kernel | launches | µs per step | share |", "|---|---|---|---|"]
    lines += [f"| `{n}` | {c} | {t:.1f} | {t / total:.1%} |" for n, c, t in rows[:top]]
    rest = rows[top:]
    if rest:
        lines.append(f"| ({len(rest)} others) | {sum(r[1] for r in rest)} | {sum(r[2] for r in rest):.1f} | "
                     f"{sum(r[2] for r in rest) / total:.1%} |")
    lines += ["", (f"GPU idle between kernels in one call: {sum(g[0] for g in gaps):.0f} µs in {len(gaps)} gaps; "
                   "largest:"), "", "| idle µs | after | before |", "|---|---|---|"]
    lines += [f"| {g:.1f} | `{a}` | `{b}` |" for g, a, b in gaps[:8]]
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--decode", default="1,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--prefill", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--host", action="store_true",
                    help="also the prefill's host side: the CPU ops of one forward by self CPU time")
    ap.add_argument("--draft", action="store_true",
                    help="also the EAGLE draft-step forward (MTP layer + lm_head) at B=1, eager and graphed")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_step needs a CUDA GPU")
    dev, dtype = torch.device("cuda"), torch.bfloat16
    batches = [int(b) for b in args.decode.split(",") if b]
    ctx = args.context
    pages_per_seq = -(-(ctx + 1) // PAGE)
    # decode sequences' pages, then (--draft) one sequence's target + draft KV, then the prefill's
    num_pages = 1 + max(batches + [int(args.draft)]) * (pages_per_seq + 1) + -(-args.prefill // PAGE)
    model = random_model(AIR, dev, dtype)  # (with the MTP layer, unused here)
    runner = ModelRunner("", dev, dtype, PAGE, num_pages, with_mtp=args.draft, model=model)
    out = [f"# profile_step: {torch.cuda.get_device_name(0)}, 4-layer Air-shaped model, context {ctx}", ""]
    if batches:
        runner.capture_decode_graphs(max(batches))
    for b in batches:
        pages = [list(range(1 + i * pages_per_seq, 1 + (i + 1) * pages_per_seq)) for i in range(b)]  # in the pool
        for i in range(b):  # fill the context's KV
            runner.forward(ForwardBatch.build([SeqSpec([(7 * t + i) % 151552 for t in range(ctx)], range(ctx), ctx,
                                                       pages[i], logit_rows=[])], PAGE, dev))
        step = ForwardBatch.decode([11] * b, [ctx] * b, pages, PAGE, dev)
        graphs, runner.graphs = runner.graphs, {}

        def eager(step: ForwardBatch = step) -> None:
            runner.decode_logits(step)

        out += section(f"decode B={b}, eager", measure.median_event_us(eager, args.reps), eager, args.reps, args.top)
        runner.graphs = graphs

        def replay(step: ForwardBatch = step) -> None:
            runner.decode_logits(step)

        out += section(f"decode B={b}, CUDA graph", measure.median_event_us(replay, args.reps), replay, args.reps, args.top)
        print("\n".join(out[-args.top - 8:]), flush=True)
    if args.draft:
        pages = [list(range(1, 1 + pages_per_seq + 1))]
        runner.capture_spec_graphs(1, 3, 1, 4)
        fill = ForwardBatch.build([SeqSpec([(5 * t) % 151552 for t in range(ctx)], range(ctx), ctx, pages[0],
                                           logit_rows=[])], PAGE, dev)
        _, h = runner.forward(fill)
        runner.draft_forward(fill, h)
        step = ForwardBatch.tree(torch.full((1, 1), 7, device=dev), torch.zeros(1, 1, dtype=torch.int64, device=dev),
                                 torch.ones(1, 1, 1, dtype=torch.bool, device=dev), [ctx], pages, PAGE)
        hid = torch.randn(1, model.config.hidden_size, device=dev, dtype=dtype)
        spec, runner.graphs = runner.graphs, {}

        def draft_eager() -> None:
            runner.draft_step_forward(step, hid)

        out += section("EAGLE draft step B=1, eager", measure.median_event_us(draft_eager, args.reps), draft_eager, args.reps, args.top)
        runner.graphs = spec

        def draft_graph() -> None:
            runner.draft_step_forward(step, hid)

        out += section("EAGLE draft step B=1, CUDA graph", measure.median_event_us(draft_graph, args.reps), draft_graph, args.reps,
                       args.top)
    if args.prefill:
        n = args.prefill
        pages = list(range(num_pages - -(-n // PAGE), num_pages))
        batch = ForwardBatch.build([SeqSpec([(3 * t) % 151552 for t in range(n)], range(n), n, pages)], PAGE, dev)

        def prefill() -> None:
            runner.forward(batch)

        out += section(f"prefill 1x{n}, eager", measure.median_event_us(prefill, max(3, args.reps // 2)), prefill,
                       max(3, args.reps // 2), args.top)
        if args.host:
            torch.cuda.synchronize()
            # one warm-up step under the profiler: its first op carries the profiler's own start-up
            with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=1)) as prof:
                for _ in range(2):
                    prefill()
                    torch.cuda.synchronize()
                    prof.step()
            out += [f"### prefill 1x{n}, host side of one forward (CPU ops by self time)", "", "```",
                    prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top), "```", ""]
    text = "\n".join(out)
    print(text)
    measure.write_out("profile_step.md", text + "\n")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
