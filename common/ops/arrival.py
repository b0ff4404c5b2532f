"""Last-arrival epilogues: the last program of a group finishes the group's result in the same launch.

Some results need every program of a group first: the FP8 scale of a row is the maximum over the
whole row, written by several programs (one per attention head, one per GEMM N tile). Done as a
second kernel it costs a launch and a dependency wait (~2-4 us each on Hopper, the larger part of a
small kernel's time in a one-token decode step). Here each program stores its part, then counts
itself in on the group's counter; the program that arrives last sees every part and does the
final step (quantise the row, pick the top-k), so the launch and the wait are gone.

Ordering: `last_arrival` puts a CTA barrier before an acquire-release atomic at GPU scope (the
pattern of a grid-wide barrier: every thread's stores precede the one releasing atomic, and the
acquiring one precedes every load after it), and the last program reads the others' parts with
`.cg` loads (L2, never a stale L1 line). The last program resets the counter, so the counters are
zero again when the launch ends and a CUDA graph can replay the kernel.

The counters are one persistent zeroed int32 buffer per device, shared by the kernels that use
them: the kernels of a forward run one after another on one stream (with PDL too: a kernel's
programs touch the counters only after `pdl_start` has waited for the kernel before), so no two
launches use a counter at once.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# GLMSERVE_LAST_ARRIVAL=1 turns the epilogues on; off, every group's final step is a launch of its
# own. Off by default: docs/performance.md §7i says where they have run (benchmarks flip this to time
# both; read at call time).
ENABLED = os.environ.get("GLMSERVE_LAST_ARRIVAL", "0") == "1"
COUNTER_SLOTS = 1 << 16
_counters: dict[tuple[str, int], torch.Tensor] = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """The device's zeroed int32 counters, at least `n` of them (allocated once, on first use:
    before a CUDA graph capture, by the warm-up run)."""
    if n > COUNTER_SLOTS:
        raise ValueError(f"arrival.counters: {n} groups in one launch, more than the {COUNTER_SLOTS} counters")
    key = (device.type, device.index if device.index is not None else
           (torch.cuda.current_device() if device.type == "cuda" else 0))
    buf = _counters.get(key)
    if buf is None:
        buf = _counters[key] = torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device)
    return buf


@triton.jit
def last_arrival(counter_ptr, expected):
    """Whether this program is the last of the `expected` programs that call this on `counter_ptr`
    (true in exactly one of them, which also sets the counter back to zero). Every store any of
    them made before the call is visible to the last one's `.cg` loads after it."""
    tl.debug_barrier()  # all of this program's threads have stored their part
    seen = tl.atomic_add(counter_ptr, 1, sem="acq_rel", scope="gpu")
    last = seen == expected - 1
    if last:
        tl.atomic_xchg(counter_ptr, 0, sem="relaxed", scope="gpu")
    tl.debug_barrier()
    return last


@triton.jit
def load_parts(ptrs, mask, CG: tl.constexpr):
    """tl.load(ptrs, mask, other=0) as fp32; CG: through L2 only, for values other programs of the
    launch stored (read after `last_arrival`)."""
    if CG:
        x = tl.load(ptrs, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        x = tl.load(ptrs, mask=mask, other=0.0)
    return x.to(tl.float32)


__all__ = ["COUNTER_SLOTS", "ENABLED", "counters", "last_arrival", "load_parts"]
