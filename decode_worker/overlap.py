"""What the overlapped plain-decode loop keeps between two steps.

The engine launches step N+1 before it has looked at step N's tokens: step N's sampled tokens stay
on the device (`LaunchedStep.tokens`) and become step N+1's input ids there (`feed_tokens`), while a
non-blocking copy brings them to the host, where they are committed, checked and emitted as soon as
the copy's event fires, during step N+1's forward. On CPU the "device" work is synchronous and the
same bookkeeping runs with no event.

Invariants while a step is in flight for a running request r (it is in `rows`):
- r.kv_len already counts the slot that step writes; r.output_ids lacks the token it samples;
- the next step feeds that token from the device, at output position len(r.output_ids) + 1;
- a request released meanwhile (finished, aborted) keeps its row: its token is dropped on completion
  and its pages wait on the scheduler's fence until the step is done on the device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.forward.batch import to_device
from decode_worker.scheduler import DecodeReq


@dataclass(eq=False)
class LaunchedStep:
    reqs: list[DecodeReq]
    tokens: torch.Tensor  # [B] int64 on the device: reqs[b]'s sampled token
    host: torch.Tensor  # [B] int64 on the host (pinned on CUDA): valid once `done` fired
    done: torch.cuda.Event | None  # recorded after the device->host copy; None on CPU
    rows: dict[DecodeReq, int]  # request -> its row
    fence: list[int] = field(default_factory=list)  # pages released while this was the newest step

    @classmethod
    def start(cls, reqs: list[DecodeReq], tokens: torch.Tensor) -> LaunchedStep:
        """Record a launched step whose sampled tokens are (or will be, on CUDA) in `tokens`."""
        if tokens.device.type == "cuda":
            host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            host.copy_(tokens, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(tokens.device))
        else:
            host, done = tokens, None
        return cls(reqs, tokens, host, done, {r: i for i, r in enumerate(reqs)})

    def wait(self) -> list[int]:
        """Block until the step's tokens are on the host; returns them, one per row."""
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()

    def in_flight(self, req: DecodeReq) -> int:
        """1 when `req` has a token in this step (not committed yet), else 0."""
        return 1 if req in self.rows else 0


def wants_token(req: DecodeReq, prev: LaunchedStep | None) -> bool:
    """False when the token `prev` samples for `req` is already its last (max_tokens): launching the
    request again would only compute a token nobody may see."""
    cap = req.params.max_tokens
    return cap is None or len(req.output_ids) + (prev.in_flight(req) if prev else 0) < cap


def feed_tokens(input_ids: torch.Tensor, prev_tokens: torch.Tensor, src: list[int]) -> None:
    """input_ids[b] = prev_tokens[src[b]] for every b with src[b] >= 0, on the device, without a sync.

    input_ids [B] int64 and prev_tokens [B'] int64 on one device; src: host row map (-1: keep)."""
    pairs = [(b, s) for b, s in enumerate(src) if s >= 0]
    if not pairs:
        return
    n = len(pairs)
    if all(b == s for b, s in pairs) and pairs[-1][0] == n - 1:  # the common case: the same leading rows
        input_ids[:n].copy_(prev_tokens[:n])
        return
    idx = to_device(torch.tensor(pairs, dtype=torch.int64).T.contiguous(), input_ids.device)  # [2, n]
    input_ids.index_copy_(0, idx[0], prev_tokens.index_select(0, idx[1]))
