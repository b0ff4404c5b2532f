"""Shared measuring helpers of the benchmarks: device facts, measured ceilings, graph-replay and
CUDA-event timing, relative error by norm, and the $OUT directory results are written to.

Ceilings: device copy (bytes read + written over time), pure read (a Triton streaming-sum kernel),
bf16 GEMM 8192^3 on random data (`fp8_gemm_tflops`: the FP8 one). Kernel times: median of
CUDA-event-timed replays of a CUDA graph that runs the call once per input set (no Python launch
gaps; rotation defeats the 50 MB L2); torch references that sync the host are timed eagerly with
triton.testing.do_bench (median).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import triton
import triton.language as tl


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20, check=False).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - informational only
        driver = "unknown"
    return {"gpu": torch.cuda.get_device_name(0), "driver": driver, "sms": props.multi_processor_count,
            "mem_gib": round(props.total_memory / 2**30, 1), "torch": torch.__version__,
            "triton": triton.__version__, "cuda": torch.version.cuda}


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(ITERS):
        offs = (pid * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, axis=0))


def _bandwidths(n: int) -> tuple[float, float]:
    """(device copy GB/s counting read+write, pure read GB/s) over n bf16 elements."""
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    t_copy = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    t_read = triton.testing.do_bench(read_call(src), warmup=50, rep=300, return_mode="median")
    return 2 * 2 * n / t_copy / 1e6, 2 * n / t_read / 1e6


def read_call(src: torch.Tensor) -> Callable[[], object]:
    """One launch of the streaming-read kernel over all of `src` (bf16): the time the pure read of
    that many bytes takes as a single kernel, launch and ramp included."""
    n = src.numel()
    block, iters = 4096, 16
    grid = triton.cdiv(n, block * iters)
    partial = torch.empty(grid, device=src.device, dtype=torch.float32)
    return lambda: _read_kernel[(grid,)](src, partial, n, BLOCK=block, ITERS=iters, num_warps=8)


def _gemm_tflops(size: int = 8192) -> float:
    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    t_mm = triton.testing.do_bench(lambda: a @ b, warmup=100, rep=500, return_mode="median")
    return 2 * size**3 / t_mm / 1e9


def fp8_gemm_tflops(size: int = 8192) -> dict:
    """FP8 GEMM rate on random E4M3 size^3 through torch._scaled_mm with row-wise scales and a bf16
    output (the channel FP8 linear's call): {"fp8_tflops": fp32 accumulation, "fp8_fast_tflops":
    Hopper's fast accumulation}; the larger is the FP8 peak a kernel is held to."""
    a = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
    b = torch.randn(size, size, device="cuda").to(torch.float8_e4m3fn)
    sa, sb = torch.ones(size, 1, device="cuda"), torch.ones(1, size, device="cuda")
    out = {}
    for key, fast in (("fp8_tflops", False), ("fp8_fast_tflops", True)):
        t_mm = triton.testing.do_bench(
            lambda fast=fast: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16,
                                               use_fast_accum=fast),
            warmup=100, rep=500, return_mode="median")
        out[key] = 2 * size**3 / t_mm / 1e9
    return out


def measure_ceilings(cache: Path | None = None) -> dict:
    """{copy_gbs, read_gbs, gemm_tflops}; reused from `cache` when it exists."""
    if cache is not None and cache.is_file():
        return json.loads(cache.read_text())
    copy_gbs, read_gbs = _bandwidths(1 << 30)  # 2 GiB of bf16
    torch.cuda.empty_cache()
    out = {"copy_gbs": copy_gbs, "read_gbs": read_gbs, "gemm_tflops": _gemm_tflops()}
    torch.cuda.empty_cache()
    if cache is not None:
        cache.write_text(json.dumps(out))
    return out


def rotations(bytes_per_call: float, l2_bytes: float = 50e6, cap: int = 32) -> int:
    """Input sets to cycle through so that the working set is >= 4x L2."""
    return max(1, min(cap, int(-(-4 * l2_bytes // max(bytes_per_call, 1)))))


def time_graph(calls: Sequence[Callable[[], object]], reps: int = 30) -> float:
    """Median microseconds per call: one graph runs every call once; replays timed by events."""
    for call in calls:  # compile and fill caches outside the capture
        call()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    del graph
    return statistics.median(times) * 1e3 / len(calls)


def median_event_us(fn: Callable[[], object], reps: int, before: Callable[[], object] | None = None,
                    warmup: int = 3) -> float:
    """Median microseconds of fn() alone over reps CUDA-event-timed calls from an idle GPU (after
    `warmup` untimed calls); before() runs untimed ahead of every call."""
    for _ in range(warmup):
        if before:
            before()
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        if before:
            before()
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def time_eager(call: Callable[[], object], rep_ms: int = 100) -> float:
    """Median microseconds of an eager call (includes its host work)."""
    return triton.testing.do_bench(call, warmup=10, rep=rep_ms, return_mode="median") * 1e3


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def out_dir() -> Path | None:
    """$OUT (created), where a run's tables and logs go; None when OUT is unset."""
    out = os.environ.get("OUT")
    if not out:
        return None
    path = Path(out)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_out(name: str, text: str) -> None:
    """Write text to $OUT/name when OUT is set."""
    out = out_dir()
    if out is not None:
        (out / name).write_text(text)


def publish(name: str, device: str, text: str, note: str = "") -> None:
    """Print a serving benchmark's tables and write them to $OUT/name under a line naming the device
    (`device` as the workers were given it, "cpu" or "cuda:N") and `note`."""
    print(text, flush=True)
    gpu = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    write_out(name, f"device: {device} ({gpu}){note}\n\n{text}\n")
