"""Programmatic dependent launch (Hopper and newer) for the Triton kernels of a forward.

A kernel launched with `launch_pdl=True` may be scheduled while the kernel before it on the stream
is still running: its programs call `pdl_start` first, which waits (griddepcontrol.wait) until
every earlier kernel has finished and its writes are visible, and then lets the next kernel be
scheduled in turn (griddepcontrol.launch_dependents). Nothing is read or written before the wait,
so the results are those of plain launches; what changes is that the launch latency and the ramp
of each kernel overlap the tail of the one before, which is most of the idle time between the
short kernels of a decode step. CUDA graphs keep these edges when captured.

The kernels on the forward path (norms and the quantisers fused with them, the FP8 GEMMs, RoPE and
the KV store, attention, the router, top-k and the fused MoE) take a `PDL` constexpr and are
launched with `pdl_kwargs(device)`. GLMSERVE_PDL=0 turns it off for a process; `ENABLED` is the
switch benchmarks flip to time both.

Weight prefetch. A kernel launched this way becomes resident while its predecessor still runs, and
the short kernels of a decode step (norms, quantisers, attention, top-k) leave the memory system
almost idle. The FP8 GEMMs at few tokens use that time: before their wait, a launch's first programs
(the ones made resident first) ask L2 for the whole weight slice they will stream
(`prefetch_rows`, PTX prefetch.global.L2: no register, no value). Weights are never written by a
forward, so asking for them early cannot change a result. The budget (`PREFETCH_BYTES` a launch,
GLMSERVE_PREFETCH_MB) should be about what one short predecessor's runtime can bring in, well
inside L2: lines asked for long before use would be evicted and read twice. 16 MB by the H100
A/B (`bench_full_depth --prefetch-ab`, docs/performance.md §7j): decode 1 % faster at B = 1 and 32
than without; 0 turns it off.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = os.environ.get("GLMSERVE_PDL", "1") != "0"
PREFETCH_BYTES = int(float(os.environ.get("GLMSERVE_PREFETCH_MB", "16")) * 1e6)


@functools.cache
def supported(device: torch.device) -> bool:
    """Hopper or newer, on the GPU only (the interpreter has no launch attributes)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels launched now for `device` go out as programmatic dependents."""
    return ENABLED and supported(device)


def pdl_kwargs(device: torch.device) -> dict[str, bool]:
    """The launch keywords of a kernel that starts with pdl_start: PDL and launch_pdl, both on or off."""
    on = pdl_enabled(device)
    return {"PDL": on, "launch_pdl": on}


@triton.jit
def pdl_start(PDL: tl.constexpr):
    """First statement of a kernel launched with launch_pdl=PDL (a no-op when PDL is False)."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def prefetch_programs(bytes_per_program: int, pdl: bool) -> int:
    """How many of a launch's first programs (the ones the GPU makes resident first) ask L2 for
    their whole weight slice before the wait: PREFETCH_BYTES' worth; 0 without PDL (then nothing
    runs before the kernel to hide it behind)."""
    if not pdl or PREFETCH_BYTES <= 0 or bytes_per_program <= 0:
        return 0
    return PREFETCH_BYTES // bytes_per_program


@triton.jit
def _prefetch_l2(ptrs):
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def prefetch_rows(base, rows, row_stride, k_lo, k_hi):
    """Ask L2 for bytes [k_lo, k_hi) of each weight row `rows` (1-byte elements, `row_stride`
    apart), four 128-byte lines a row per step (the last step clamped to byte k_hi - 1). Issued
    before pdl_start, on weights only (nothing a kernel writes)."""
    lines = tl.arange(0, 4) * 128
    row_ptrs = base + rows.to(tl.int64)[:, None] * row_stride
    for k0 in range(k_lo, k_hi, 512):
        _prefetch_l2(row_ptrs + tl.minimum(k0 + lines, k_hi - 1)[None, :])


__all__ = ["ENABLED", "PREFETCH_BYTES", "pdl_enabled", "pdl_kwargs", "pdl_start", "prefetch_programs",
           "prefetch_rows", "supported"]
