"""Plans: what a TP leader tells its followers before each thing they must do in step with it.

The leader (rank 0) schedules, samples and owns every host decision; its followers only repeat the
leader's forwards on their shards (each forward's collectives need every rank). Before each such
call the leader's ModelRunner publishes a plan (`Mirror.publish`): the plan's fields go through
every follower's pipe as one small message (`<H` kind, then struct-packed fields: 28 bytes plus
three int64 per sequence for a forward, no pickling), and its tensors follow through the TP group's
broadcast — the ForwardBatch's device arrays packed into one int64 tensor, and the hidden input of
a draft forward unless the followers already hold it (the last target forward's output). So a
batch the leader built on its device (EAGLE trees, tokens sampled on the device) reaches the
followers without a host copy, and the followers never see a request.

Kinds below 16 are the runner's (this module); the worker layer registers its own (KV transport)
with `register`.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, ClassVar, Protocol

import torch

from common.forward.batch import ForwardBatch

log = logging.getLogger(__name__)


class PlanKind(IntEnum):
    FORWARD = 1  # target forward, eager (prefill chunks, KV rebuilds)
    DRAFT = 2  # MTP draft forward, eager
    RUN = 3  # a forward that may replay a CUDA graph (cuda_graphs.Forward: decode, verify, draft step/extend)
    COPY_SLOTS = 4  # KV moves inside the pool (EAGLE's accepted path)
    CAPTURE = 5  # capture CUDA graphs
    RELEASE = 6  # drop the graphs
    STOP = 7  # the follower exits


WORKER_KINDS = 16  # plan kinds from here on are the worker layer's (common/worker/tp_kv.py)


class HiddenInput(IntEnum):
    NONE = 0
    SENT = 1  # broadcast after the batch
    LAST = 2  # the output of the last target forward, which every rank holds


class Plan(Protocol):
    """A plan: its kind (the wire's first field) and its packed fields."""

    @property
    def kind(self) -> int: ...

    def body(self) -> bytes: ...


_DECODERS: dict[int, Callable[[int, bytes], Any]] = {}
_HEAD = struct.Struct("<H")


def register(kinds: Sequence[int], decode: Callable[[int, bytes], Any]) -> None:
    """Make `decode(kind, body)` the decoder of plans of `kinds`."""
    for k in kinds:
        if k in _DECODERS:
            raise ValueError(f"plan kind {k} is registered twice")
        _DECODERS[k] = decode


def encode(plan: Plan) -> bytes:
    return _HEAD.pack(plan.kind) + plan.body()


def decode(data: bytes) -> Any:
    (kind,) = _HEAD.unpack_from(data)
    fn = _DECODERS.get(kind)
    if fn is None:
        raise ValueError(f"unknown plan kind {kind}")
    return fn(kind, data[_HEAD.size:])


# ------------------------------------------------------------------------------------ forwards
@dataclass(frozen=True)
class BatchMeta:
    """A ForwardBatch's shapes and host lengths: enough to receive and rebuild its device arrays."""

    page_size: int
    query_lens: tuple[int, ...]
    prefix_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]
    width: int  # page table columns
    rows: int  # logit rows
    mask: int  # mask entries (-1: no mask)

    @classmethod
    def of(cls, b: ForwardBatch) -> BatchMeta:
        return cls(b.page_size, tuple(b.query_lens_host), tuple(b.prefix_lens_host), tuple(b.seq_lens_host),
                   int(b.page_table.shape[1]), int(b.logit_rows.shape[0]), -1 if b.mask is None else int(b.mask.shape[0]))

    @property
    def sizes(self) -> list[int]:
        """Lengths of the packed fields: ids, positions, query_start, prefix, seq lens, page table, slots,
        logit rows (+ mask, mask_start)."""
        b, t = len(self.seq_lens), sum(self.query_lens)
        out = [t, t, b + 1, b, b, b * self.width, t, self.rows]
        return out + ([self.mask, b + 1] if self.mask >= 0 else [])

    @staticmethod
    def pack(b: ForwardBatch) -> torch.Tensor:
        """The batch's device arrays as one int64 tensor (on the batch's device, no host sync)."""
        parts = [b.input_ids, b.positions, b.query_start, b.prefix_lens, b.seq_lens, b.page_table.reshape(-1),
                 b.out_slots, b.logit_rows]
        if b.mask is not None:
            parts += [b.mask, b.mask_start]
        return torch.cat([p.to(torch.int64) for p in parts])

    def unpack(self, flat: torch.Tensor) -> ForwardBatch:
        f = flat.split(self.sizes)
        i32 = torch.int32
        return ForwardBatch(
            input_ids=f[0], positions=f[1], query_start=f[2].to(i32), prefix_lens=f[3].to(i32), seq_lens=f[4].to(i32),
            page_table=f[5].view(len(self.seq_lens), self.width).to(i32), out_slots=f[6], logit_rows=f[7],
            page_size=self.page_size, mask=f[8].to(torch.bool) if self.mask >= 0 else None,
            mask_start=f[9] if self.mask >= 0 else None, query_lens_host=self.query_lens,
            prefix_lens_host=self.prefix_lens, seq_lens_host=self.seq_lens)


_FWD = struct.Struct("<8i")


@dataclass(frozen=True)
class ForwardPlan:
    """One forward: FORWARD (target), DRAFT (MTP) or RUN (`forward`: cuda_graphs.Forward's position)."""

    kind: PlanKind
    meta: BatchMeta
    hidden: HiddenInput = HiddenInput.NONE
    forward: int = 0
    topk: int = 0

    def body(self) -> bytes:
        m = self.meta
        head = _FWD.pack(self.forward, self.topk, int(self.hidden), m.page_size, m.width, m.rows, m.mask,
                         len(m.seq_lens))
        return head + struct.pack(f"<{3 * len(m.seq_lens)}q", *m.query_lens, *m.prefix_lens, *m.seq_lens)

    @classmethod
    def from_body(cls, kind: int, body: bytes) -> ForwardPlan:
        fwd, topk, hidden, page, width, rows, mask, n = _FWD.unpack_from(body)
        lens = struct.unpack_from(f"<{3 * n}q", body, _FWD.size)
        meta = BatchMeta(page, lens[:n], lens[n:2 * n], lens[2 * n:], width, rows, mask)
        return cls(PlanKind(kind), meta, HiddenInput(hidden), fwd, topk)


@dataclass(frozen=True)
class CopySlotsPlan:
    """KV of `n` flat slots copied onto `n` others; the slots follow as one int64 [2n] (src | dst)."""

    kind: ClassVar[int] = PlanKind.COPY_SLOTS
    n: int

    def body(self) -> bytes:
        return struct.pack("<q", self.n)

    @classmethod
    def from_body(cls, kind: int, body: bytes) -> CopySlotsPlan:
        return cls(*struct.unpack("<q", body))


@dataclass(frozen=True)
class CapturePlan:
    """Capture the decode graphs (spec False) or EAGLE's (num_steps, topk, num_draft_tokens)."""

    kind: ClassVar[int] = PlanKind.CAPTURE
    spec: bool
    max_bs: int
    num_steps: int = 0
    topk: int = 0
    num_draft_tokens: int = 0

    def body(self) -> bytes:
        return struct.pack("<5i", int(self.spec), self.max_bs, self.num_steps, self.topk, self.num_draft_tokens)

    @classmethod
    def from_body(cls, kind: int, body: bytes) -> CapturePlan:
        spec, *rest = struct.unpack("<5i", body)
        return cls(bool(spec), *rest)


@dataclass(frozen=True)
class ReleasePlan:
    kind: ClassVar[int] = PlanKind.RELEASE

    def body(self) -> bytes:
        return b""

    @classmethod
    def from_body(cls, kind: int, body: bytes) -> ReleasePlan:
        return cls()


@dataclass(frozen=True)
class StopPlan:
    kind: ClassVar[int] = PlanKind.STOP

    def body(self) -> bytes:
        return b""

    @classmethod
    def from_body(cls, kind: int, body: bytes) -> StopPlan:
        return cls()


register((PlanKind.FORWARD, PlanKind.DRAFT, PlanKind.RUN), ForwardPlan.from_body)
for _cls in (CopySlotsPlan, CapturePlan, ReleasePlan, StopPlan):
    register((_cls.kind,), _cls.from_body)


# ------------------------------------------------------------------------------------ the leader's side
class TPBroken(RuntimeError):
    """The TP group cannot go on (a follower is gone, or a step failed half-way on some rank)."""


class Mirror:
    """The leader's channel to its followers: `publish` writes a plan to every follower's pipe, then
    broadcasts its tensors; `publish_to` writes one follower's. Plans without tensors (the KV
    transport's) may come from any thread: each pipe message is written whole under a lock.
    `fail(reason)` reports a broken group to whoever watches it and returns the group's failure as
    they know it (a rank's death, when that is what broke it)."""

    def __init__(self, tp: Any, pipes: Sequence[Any], on_fail: Callable[[str], str]) -> None:
        self.tp, self.pipes, self._on_fail = tp, list(pipes), on_fail  # pipes[r - 1]: follower r's
        self._lock = threading.Lock()

    def publish(self, plan: Plan, tensors: Sequence[torch.Tensor] = ()) -> None:
        data = encode(plan)
        with self._lock:
            for rank in range(1, len(self.pipes) + 1):
                self._write(rank, data)
        for t in tensors:
            try:
                self.tp.broadcast(t)
            except Exception as e:  # a follower died mid-broadcast (the collective sees it first)
                raise TPBroken(self.fail(f"broadcasting a {type(plan).__name__}'s tensors failed: {e!r}")) from e

    def publish_to(self, rank: int, plan: Plan) -> None:
        data = encode(plan)
        with self._lock:
            self._write(rank, data)

    def _write(self, rank: int, data: bytes) -> None:
        try:
            self.pipes[rank - 1].send_bytes(data)
        except OSError as e:
            raise TPBroken(self.fail(f"TP rank {rank} is gone ({e})")) from None

    def fail(self, reason: str) -> str:
        return self._on_fail(reason)
