"""The decode engine loop with and without the overlapped schedule, without gRPC or a gateway.

    python3 -m benchmarks.model_step.bench_overlap [--batches 1,8,32] [--context 1024] [--steps 128]
                                       [--sampling greedy|seeded] [--tiny]

Model: GLM-4.5-Air-shaped layers with random bf16 weights (benchmarks.model_step.air_model), decode CUDA graphs
captured as the worker does. Per batch size B: B requests of `context` prompt tokens are prefilled,
then the real DecodeEngine thread (PlainStepper) decodes `steps` tokens each while asyncio tasks on
another thread drain the real output channels, as the gRPC servicer does. Reported per schedule
(sync = --disable-overlap-schedule, overlap = the default): inter-token latency seen by the channel
consumers (median over requests, first event excluded) and output tokens/s; next to them the GPU
floor, the median time of back-to-back replays of the decode graph at B (CUDA events). The gap
between the sync ITL and the floor is the host work the overlap is meant to hide.

--tiny runs the tiny test model (on CPU by default) to check the script, not to measure.
With OUT set, writes $OUT/bench_overlap.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import threading
import time

import torch

from benchmarks import measure
from benchmarks.model_step.air_model import AIR, random_model
from common.forward.batch import ForwardBatch, SeqSpec
from common.runtime.runner import ModelRunner
from common.sampling.logit_processors import RowContext
from common.sampling.token_sampler import SpecialIds, TokenSampler
from common.serving.sampling_params import SamplingParams
from common.transport.aux import AuxRecord
from decode_worker.commit import StopRules
from decode_worker.output import FinishEvent, OutputChannel, TokenEvent
from decode_worker.scheduler import DecodeReq, Scheduler
from decode_worker.steps import PlainStepper
from decode_worker.worker import DecodeEngine

PAGE = 16
SAMPLING = {"greedy": {"temperature": 0.0}, "seeded": {"temperature": 0.8, "top_p": 0.95, "seed": 1234}}


def build_runner(args: argparse.Namespace) -> tuple[ModelRunner, SpecialIds]:
    device = torch.device(args.device)
    if args.tiny:
        from common.tools.generate import ensure_tiny_model

        model_dir = ensure_tiny_model()
        dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
        runner = ModelRunner(model_dir, device, dtype, PAGE, 0 if device.type == "cuda" else 1024)
        return runner, SpecialIds.from_model_dir(str(model_dir))
    runner = ModelRunner("", device, torch.bfloat16, PAGE, 0, model=random_model(AIR, device, torch.bfloat16))
    return runner, SpecialIds(None, None, None, ())


def gpu_floor_ms(runner: ModelRunner, batch_size: int, context: int) -> float:
    """Median time of back-to-back decode forwards (graph replays) at this batch size."""
    if runner.device.type != "cuda":
        return float("nan")
    pages = runner.allocator.alloc(batch_size * (context // PAGE + 1))
    assert pages is not None, "KV pool too small for the floor measurement"
    per = context // PAGE + 1
    batch = ForwardBatch.decode([1] * batch_size, [context] * batch_size,
                                [pages[i * per:(i + 1) * per] for i in range(batch_size)], PAGE, runner.device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for i in range(30):
        start.record()
        for _ in range(10):
            runner.decode_logits(batch)
        end.record()
        end.synchronize()
        if i >= 3:
            times.append(start.elapsed_time(end) / 10)
    runner.allocator.free(pages)
    return statistics.median(times)


def prefill(runner: ModelRunner, sampler: TokenSampler, req: DecodeReq) -> AuxRecord:
    p = req.prompt_ids
    logits, _ = runner.forward(ForwardBatch.build([SeqSpec(p, range(len(p)), len(p), req.pages)], PAGE,
                                                  runner.device))
    first = sampler.sample(logits, [RowContext(req.params, p, [])])[0].token
    return AuxRecord.build(transfer_id=req.transfer_id, first_token=first, first_logprob=0.0, prompt_len=len(p))


def run_engine(runner: ModelRunner, ids: SpecialIds, batch_size: int, args: argparse.Namespace,
               overlap: bool) -> tuple[float, float]:
    """(median inter-token latency in ms, output tokens/s) of B requests decoded together."""
    loop = asyncio.new_event_loop()
    loop_thread = threading.Thread(target=loop.run_forever, daemon=True)
    loop_thread.start()
    rules = StopRules(ids.eos)
    sched = Scheduler(runner.allocator, PAGE, max(64, batch_size), max_queued=256, step_slots=1)
    engine = DecodeEngine(sched, PlainStepper(runner, TokenSampler(ids), rules), rules, overlap=overlap)
    engine.start()
    gen = torch.Generator().manual_seed(batch_size)
    vocab = runner.config.vocab_size
    params = SamplingParams(max_tokens=args.steps, ignore_eos=True, **SAMPLING[args.sampling])
    reqs = [DecodeReq(f"r{i}", i + 1, torch.randint(0, min(vocab, 800), (args.context,), generator=gen).tolist(),
                      params, OutputChannel(loop)) for i in range(batch_size)]

    async def admit(req: DecodeReq) -> None:
        fut = asyncio.get_running_loop().create_future()
        engine.submit(req, fut)
        await fut
        assert await engine.wait_reserved(req.transfer_id, 60), "no KV reservation"

    async def consume(req: DecodeReq) -> list[tuple[float, int]]:
        stamps = []
        while True:
            ev = await req.channel.get()
            if isinstance(ev, TokenEvent):
                stamps.append((time.perf_counter(), len(ev.token_ids)))
            elif isinstance(ev, FinishEvent):
                return stamps
            else:
                raise RuntimeError(f"{req.request_id} failed: {ev}")  # noqa: TRY004 - an ErrorEvent

    try:
        for req in reqs:
            asyncio.run_coroutine_threadsafe(admit(req), loop).result(60)
        sampler = TokenSampler(ids)
        auxes = [prefill(runner, sampler, r) for r in reqs]
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        consumers = [asyncio.run_coroutine_threadsafe(consume(r), loop) for r in reqs]
        for r, aux in zip(reqs, auxes):
            engine.kv_ready(r.transfer_id, aux)
        stamps = [c.result(600) for c in consumers]
    finally:
        engine.stop()
        loop.call_soon_threadsafe(loop.stop)
        loop_thread.join(5)
    itl = [(s[-1][0] - s[0][0]) / sum(n for _, n in s[1:]) for s in stamps if len(s) > 1]
    tokens = sum(n for s in stamps for _, n in s)
    wall = max(s[-1][0] for s in stamps) - min(s[0][0] for s in stamps)
    return statistics.median(itl) * 1e3, tokens / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default=None, help="default: cuda:0, or cpu with --tiny")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=128, help="tokens decoded per request")
    ap.add_argument("--sampling", default="greedy", choices=sorted(SAMPLING))
    ap.add_argument("--tiny", action="store_true", help="the tiny test model (a check of the script)")
    args = ap.parse_args()
    args.device = args.device or ("cpu" if args.tiny else "cuda:0")
    batches = [int(b) for b in args.batches.split(",")]
    runner, ids = build_runner(args)
    if runner.device.type == "cuda":
        runner.capture_decode_graphs(max(batches))
    header = [("| batch | context | sampling | GPU floor (ms/step) | ITL sync (ms) | ITL overlap (ms) | "
               "tok/s sync | tok/s overlap |"), "|---|---|---|---|---|---|---|---|"]
    print("\n".join(header), flush=True)
    rows = []
    for b in batches:
        floor = gpu_floor_ms(runner, b, args.context)
        run_engine(runner, ids, b, argparse.Namespace(**{**vars(args), "steps": 8}), True)  # warm-up
        sync = run_engine(runner, ids, b, args, False)
        over = run_engine(runner, ids, b, args, True)
        row = (f"| {b} | {args.context} | {args.sampling} | {floor:.3f} | {sync[0]:.3f} | {over[0]:.3f} | "
               f"{sync[1]:.0f} | {over[1]:.0f} |")
        print(row, flush=True)
        rows.append(row)
    name = torch.cuda.get_device_name() if runner.device.type == "cuda" else "cpu"
    measure.write_out("bench_overlap.md", f"device: {name}\n\n" + "\n".join(header + rows) + "\n")


if __name__ == "__main__":
    main()
