"""The TP all-reduce on 2/4/8 GPUs: PyTorch's one-shot and two-shot all-reduces over peer memory
(common/runtime/symm_allreduce.py) against NCCL, 8 KiB to 4 MiB of bf16, each inside CUDA graphs.

    python3 -m benchmarks.kernels.bench_allreduce [--worlds 2,4,8] [--sizes-kib 8,16,32,64,128,256,512,1024,4096]
        [--calls 50] [--reps 20]

Per world size (as many as the machine has GPUs for), one process per GPU builds the worker's TP
group exactly as a TP worker does (common/runtime/distributed.py TPGroup over the leader's TCPStore,
NCCL, NVLink multicast off), then for every size and path:
- checks: the result equals the fp32 sum of every rank's input to bf16 rounding, and is bit-identical
  on every rank (rank 0 compares the others' checksums);
- times: one CUDA graph of `calls` back-to-back all-reduces, replayed `reps` times (CUDA events);
  the median per call, on rank 0.
Prints the table (with the path `choose_path` would take) and writes $OUT/bench_allreduce.{md,json}.
The target: <= 8 us per all-reduce up to 128 KiB.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import traceback
from typing import Any

import torch

from benchmarks import measure

PATHS = ("nccl", "one_shot", "two_shot")


def _rank_main(rank: int, world: int, port: int, sizes: list[int], calls: int, reps: int, out: Any) -> None:
    for k, v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
        os.environ[k] = v
    from common.runtime import symm_allreduce as sar
    from common.runtime.distributed import TPConfig, TPGroup
    from common.transport.pair import connect_store, host_store

    try:
        torch.cuda.set_device(rank)
        store = host_store("127.0.0.1", port) if rank == 0 else connect_store("127.0.0.1", port)
        cfg = TPConfig(world, tuple(f"cuda:{r}" for r in range(world)), "nccl", 60.0, ("127.0.0.1", port))
        group = TPGroup(cfg, rank, store, name=f"bench{world}")
        rows = []
        for nbytes in sizes:
            numel = nbytes // 2
            gen = torch.Generator(device="cuda").manual_seed(1000 + rank)
            x = torch.randn(numel, generator=gen, device="cuda").bfloat16()
            want = torch.zeros(numel, device="cuda")
            for r in range(world):
                want += torch.randn(numel, generator=torch.Generator(device="cuda").manual_seed(1000 + r),
                                    device="cuda").bfloat16().float()
            row: dict[str, Any] = {"bytes": nbytes, "choice": sar.choose_path(nbytes, numel, world, sar.Limits())}
            for path in PATHS:
                if path != "nccl" and (group.custom is None or nbytes > group.custom.limits.buffer_bytes
                                       or (path == "two_shot" and numel % world)):
                    continue
                call = _caller(group, path, x)
                got = call().float()
                err = float((got - want).norm() / want.norm())
                digest = float(got.double().sum()) + float((got.double() * torch.arange(numel, device="cuda")).sum())
                row[path] = {"us": _time(call, calls, reps), "rel_err": err, "digest": digest}
            rows.append(row)
        out.put((rank, rows, group.custom is not None, None))
        group.barrier()
        group.close()
    except Exception:  # noqa: BLE001 - reported to the parent, which fails the run
        out.put((rank, [], False, traceback.format_exc()))


def _caller(group: Any, path: str, x: torch.Tensor) -> Any:
    if path == "nccl":
        def nccl() -> torch.Tensor:
            y = x.clone()
            group.dev.allreduce([y]).wait()
            return y
        return nccl
    return lambda: group.custom.reduce(x, path)


def _time(call: Any, calls: int, reps: int) -> float:
    """Median µs per all-reduce: `calls` of them back to back in one CUDA graph."""
    return measure.time_graph([call] * calls, reps)


def run_world(world: int, sizes: list[int], calls: int, reps: int) -> dict:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world, port, sizes, calls, reps, out)) for r in range(world)]
    for p in procs:
        p.start()
    results = {}
    for _ in range(world):
        rank, rows, custom_on, error = out.get(timeout=600)
        results[rank] = (rows, custom_on, error)
    for p in procs:
        p.join(timeout=60)
    errors = [f"rank {r}: {e}" for r, (_, _, e) in results.items() if e]
    if errors:
        return {"world": world, "errors": errors}
    rows0 = results[0][0]
    for row_i, row in enumerate(rows0):
        for path in PATHS:
            if path in row:
                digests = {results[r][0][row_i][path]["digest"] for r in results}
                row[path]["identical_on_ranks"] = len(digests) == 1
    return {"world": world, "custom_on": results[0][1], "rows": rows0, "errors": []}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(worlds: list[dict]) -> str:
    header = ("| GPUs | KiB | choice | NCCL us | one-shot us | two-shot us | best custom vs NCCL | rel err (max) | "
              "same bits on every rank | target <= 8 us at <= 128 KiB |")
    lines = [header, "|" + "---|" * 10]
    for w in worlds:
        if w.get("errors"):
            lines.append(f"| {w['world']} | ERROR: {' / '.join(e.splitlines()[-1] for e in w['errors'])} |")
            continue
        for row in w["rows"]:
            us = {p: row[p]["us"] for p in PATHS if p in row}
            custom = [us[p] for p in ("one_shot", "two_shot") if p in us]
            best = min(custom) if custom else None
            err = max(row[p]["rel_err"] for p in PATHS if p in row)
            same = all(row[p]["identical_on_ranks"] for p in PATHS if p in row)
            verdict = "" if row["bytes"] > 128 * 1024 else ("PASS" if best is not None and best <= 8 else "FAIL")
            cells = [f"{us[p]:.1f}" if p in us else "-" for p in PATHS]
            gain = "-" if best is None else f"{us['nccl'] / best:.2f}x"
            lines.append(f"| {w['world']} | {row['bytes'] // 1024} | {row['choice']} | {' | '.join(cells)} | "
                         f"{gain} | {err:.1e} | {same} | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", default="2,4,8")
    ap.add_argument("--sizes-kib", default="8,16,32,64,128,256,512,1024,4096")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    gpus = torch.cuda.device_count()
    worlds = [w for w in map(int, args.worlds.split(",")) if 2 <= w <= gpus]
    if not worlds:
        raise SystemExit(f"bench_allreduce needs at least 2 GPUs (this machine has {gpus})")
    sizes = [int(k) * 1024 for k in args.sizes_kib.split(",")]
    print(f"GPU {measure.device_info()}", flush=True)
    results = [run_world(w, sizes, args.calls, args.reps) for w in worlds]
    table = report(results)
    print(table, flush=True)
    measure.write_out("bench_allreduce.md", table + "\n")
    measure.write_out("bench_allreduce.json", json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
