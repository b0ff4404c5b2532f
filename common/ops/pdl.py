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
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

ENABLED = os.environ.get("GLMSERVE_PDL", "1") != "0"


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


__all__ = ["ENABLED", "pdl_enabled", "pdl_kwargs", "pdl_start", "supported"]
