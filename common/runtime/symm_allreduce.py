"""The all-reduce a TP decode step needs: one-shot / two-shot over peer GPU memory, NCCL for the rest.

A TP-8 decode step makes ~185 all-reduces of a few KiB each (two per layer); NCCL's ~20 µs per call
would cost more than the step's weight reads. Peer-memory all-reduces do it in one kernel: every rank
copies its input into a buffer all ranks have mapped (PyTorch's symmetric memory), then
- one-shot: each rank reads every peer's buffer and adds them in rank order (latency: one hop);
- two-shot: each rank reduces 1/world of the elements from every peer and writes the sum back to
  every peer's buffer, then each reads its full result (bandwidth: 2/world of the bytes per rank).
Both give every rank the same bits (the same additions in the same order), which the model relies
on (replicated routing). The kernels are PyTorch's own (`torch.ops.symm_mem`), capturable by CUDA
graphs, with no NVLink multicast (TORCH_SYMM_MEM_DISABLE_MULTICAST=1 stays set; the `multimem_*`
ops are never called).

`choose_path` is the policy (pure, tested on the CPU): one-shot up to `one_shot_max` bytes, two-shot
up to the buffer size when the elements split evenly over the ranks, NCCL beyond or for what the
buffer cannot hold. `SymmAllReduce` sets the buffer up once per TP group; where the machine or the
PyTorch build cannot (no peer access, no symmetric memory), `try_create` logs why and the group keeps
NCCL.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)

ONE_SHOT = "one_shot"
TWO_SHOT = "two_shot"
NCCL = "nccl"


@dataclass(frozen=True)
class Limits:
    """Byte limits of the peer-memory paths. Defaults: one-shot to 128 KiB (the decode all-reduces of
    B <= 16 at H = 4096-5120 in bf16), two-shot to the 4 MiB buffer; larger messages are bandwidth
    work for NCCL's ring. Measured crossovers replace them (benchmarks/kernels/bench_allreduce.py)."""

    one_shot_max: int = 128 * 1024
    buffer_bytes: int = 4 * 1024 * 1024


def choose_path(nbytes: int, numel: int, world: int, limits: Limits, *, contiguous: bool = True,
                dtype_ok: bool = True) -> str:
    """Which all-reduce serves a message of `nbytes` / `numel` elements over `world` ranks."""
    if world < 2 or not contiguous or not dtype_ok or nbytes == 0 or nbytes > limits.buffer_bytes:
        return NCCL
    if nbytes <= limits.one_shot_max:
        return ONE_SHOT
    return TWO_SHOT if numel % world == 0 else NCCL


SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class SymmAllReduce:
    """One TP rank's peer-memory all-reduce over `group` (a NCCL ProcessGroup registered under
    `group_name`); `__call__` returns the sum in a new tensor (capturable: the buffer is fixed)."""

    def __init__(self, group: Any, group_name: str, device: torch.device, limits: Limits = Limits()) -> None:
        import torch.distributed._symmetric_memory as symm_mem

        self.limits, self.group_name, self.world = limits, group_name, group.size()
        self.buffer = symm_mem.empty(limits.buffer_bytes, dtype=torch.uint8, device=device)
        self.handle = symm_mem.rendezvous(self.buffer, group_name)
        self._ops = torch.ops.symm_mem

    def path(self, x: torch.Tensor) -> str:
        return choose_path(x.numel() * x.element_size(), x.numel(), self.world, self.limits,
                           contiguous=x.is_contiguous(), dtype_ok=x.dtype in SUPPORTED_DTYPES)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over the ranks of x (path(x) must not be NCCL)."""
        return self.reduce(x, self.path(x))

    def reduce(self, x: torch.Tensor, path: str) -> torch.Tensor:
        """x summed over the ranks through `path` (ONE_SHOT or TWO_SHOT; x must fit the buffer)."""
        staged = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        staged.copy_(x)
        if path == ONE_SHOT:
            return self._ops.one_shot_all_reduce(staged, "sum", self.group_name)
        out = torch.empty_like(x)
        return self._ops.two_shot_all_reduce_out(staged, "sum", self.group_name, out)


def try_create(group: Any, group_name: str, device: torch.device, limits: Limits = Limits()) -> SymmAllReduce | None:
    """The peer-memory all-reduce for this group, or None (with one log line saying why) where this
    machine cannot run it: then the group's NCCL all-reduce serves every call."""
    if device.type != "cuda" or group.size() < 2:
        return None
    try:
        n = torch.cuda.device_count()
        here = device.index or 0
        if not all(torch.cuda.can_device_access_peer(here, other) for other in range(n) if other != here):
            log.info("custom all-reduce off: GPU %d has no peer access to every other GPU; NCCL serves", here)
            return None
        ar = SymmAllReduce(group, group_name, device, limits)
    except Exception as e:  # noqa: BLE001 - any setup failure leaves NCCL in charge, said once
        log.warning("custom all-reduce off (%s: %s); NCCL serves every all-reduce", type(e).__name__, e)
        return None
    log.info("custom all-reduce on: one-shot <= %d B, two-shot <= %d B over %d ranks (peer memory, no multicast)",
             limits.one_shot_max, limits.buffer_bytes, ar.world)
    return ar


__all__ = ["NCCL", "ONE_SHOT", "SUPPORTED_DTYPES", "TWO_SHOT", "Limits", "SymmAllReduce", "choose_path", "try_create"]
