"""What a TP leader's per-forward plan costs: encoding, publishing, and the time until a follower holds
the forward's batch (common/runtime/step_plan.py), without the forward itself.

    python3 -m benchmarks.model_step.bench_tp_plan [--device cpu|cuda] [--iters 2000]

A follower process of a 2-rank group (gloo on the CPU; on CUDA the device group, NCCL when the two
ranks get two GPUs, else gloo through host copies) receives each plan through its pipe, then the
batch's packed arrays through the group's broadcast, rebuilds the ForwardBatch and acknowledges
through a second pipe. Per batch shape: encode + decode of the plan (host, one process), the
leader's publish, and publish-to-follower-ready latency (round trip minus a measured bare pipe
acknowledgement). With OUT set, writes $OUT/bench_tp_plan.md.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import socket
import statistics
import time

import torch

from benchmarks import measure
from common.forward.batch import ForwardBatch
from common.runtime.distributed import TPConfig, TPGroup
from common.runtime.step_plan import BatchMeta, ForwardPlan, Mirror, PlanKind, StopPlan, decode, encode
from common.transport.pair import connect_store, host_store

PAGE = 16


def batches(device: str) -> dict[str, ForwardBatch]:
    def decode_batch(b: int) -> ForwardBatch:
        return ForwardBatch.decode(list(range(b)), [1000] * b, [list(range(1 + 64 * i, 65 + 64 * i)) for i in range(b)],
                                   PAGE, device)

    tree = ForwardBatch.tree(torch.zeros(64, 4, dtype=torch.long, device=device),
                             torch.zeros(64, 4, dtype=torch.long, device=device),
                             torch.ones(64, 4, 4, dtype=torch.bool, device=device), [1000] * 64,
                             [list(range(1 + 64 * i, 65 + 64 * i)) for i in range(64)], PAGE)
    return {"decode B=1": decode_batch(1), "decode B=64": decode_batch(64), "verify B=64 x 4": tree}


def follower(cfg: TPConfig, plans, acks) -> None:  # type: ignore[no-untyped-def]
    torch.set_num_threads(1)
    tp = TPGroup(cfg, 1, connect_store(*cfg.store))
    while True:
        plan = decode(plans.recv_bytes())
        if isinstance(plan, StopPlan):
            break
        if isinstance(plan, ForwardPlan):
            flat = tp.broadcast(torch.empty(sum(plan.meta.sizes), dtype=torch.int64, device=tp.device))
            plan.meta.unpack(flat)
        acks.send_bytes(b"1")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=2000)
    args = p.parse_args()
    torch.set_num_threads(1)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = TPConfig.resolve(2, args.device)
    cfg = TPConfig(2, base.devices, base.backend, 60.0, ("127.0.0.1", port))
    store = host_store("127.0.0.1", port)
    ctx = mp.get_context("spawn")
    plan_r, plan_w = ctx.Pipe(duplex=False)
    ack_r, ack_w = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=follower, args=(cfg, plan_r, ack_w), daemon=True)
    proc.start()
    tp = TPGroup(cfg, 0, store)
    mirror = Mirror(tp, [plan_w], lambda reason: reason)
    rows = []
    stop = encode(StopPlan())
    for name, batch in batches(cfg.devices[0]).items():
        plan = ForwardPlan(PlanKind.RUN, BatchMeta.of(batch))
        t0 = time.perf_counter()
        for _ in range(args.iters):
            decode(encode(plan))
        codec_us = (time.perf_counter() - t0) / args.iters * 1e6
        publish, total, bare = [], [], []
        for _ in range(args.iters):
            t0 = time.perf_counter()
            mirror.publish(plan, [BatchMeta.pack(batch)])
            t1 = time.perf_counter()
            ack_r.recv_bytes()
            t2 = time.perf_counter()
            publish.append(t1 - t0)
            total.append(t2 - t0)
            plan_w.send_bytes(encode(_Ping()))  # a plan the follower only acknowledges
            t3 = time.perf_counter()
            ack_r.recv_bytes()
            bare.append(time.perf_counter() - t3)
        med = statistics.median
        rows.append(f"| {name} | {len(encode(plan))} | {codec_us:.1f} | {med(publish) * 1e6:.1f} | "
                    f"{(med(total) - med(bare) / 2) * 1e6:.1f} | {med(bare) * 1e6:.1f} |")
    plan_w.send_bytes(stop)
    proc.join(10)
    head = ("| batch | plan bytes | encode+decode µs | publish µs | publish -> follower ready µs | "
            "bare pipe ack µs |")
    report = "\n".join([f"TP 2 plans on {cfg.devices} ({cfg.backend} broadcast), median of {args.iters}\n", head,
                        "|---|---|---|---|---|---|", *rows])
    print(report)
    measure.write_out("bench_tp_plan.md", report)


class _Ping:
    """A plan with no tensors (the release plan's kind): the follower acknowledges it at once."""

    kind = PlanKind.RELEASE

    def body(self) -> bytes:
        return b""


if __name__ == "__main__":
    main()
