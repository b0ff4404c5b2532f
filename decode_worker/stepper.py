"""What the decode engine needs of a step: the plain decode step (decode_worker/steps.py) and the
EAGLE step (decode_worker/spec/eagle.py) both provide it; the plain one can also launch."""

from __future__ import annotations

from typing import Protocol

from common.transport.aux import AuxRecord
from decode_worker.overlap import LaunchedStep
from decode_worker.scheduler import DecodeReq


class Stepper(Protocol):
    """Advances a batch of running requests by one engine step (plain decode or EAGLE)."""

    def step(self, reqs: list[DecodeReq]) -> None: ...
    def on_kv_arrival(self, req: DecodeReq, aux: AuxRecord) -> None: ...
    def recompute(self, req: DecodeReq) -> None: ...
    def prefill_local(self, req: DecodeReq) -> None: ...


class LaunchingStepper(Stepper, Protocol):
    """A stepper that can also launch a step without waiting for its tokens (overlapped loop)."""

    def can_launch(self, req: DecodeReq, step: int) -> bool: ...
    def launch(self, reqs: list[DecodeReq], prev: LaunchedStep | None) -> LaunchedStep: ...


__all__ = ["LaunchingStepper", "Stepper"]
