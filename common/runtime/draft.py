"""EAGLE draft state produced by an MTP draft-extend forward (prefill and decode both make it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch


class DraftBatch(NamedTuple):
    """The draft states of B requests as batched tensors (what a batched draft extend returns)."""

    topk_p: torch.Tensor  # [B, k] fp32 draft probabilities of the token after each pending one
    topk_idx: torch.Tensor  # [B, k] int64
    hidden: torch.Tensor  # [B, H] draft hidden (post shared_head.norm) at each last KV position


class DraftState:
    """What the next decode step needs from the draft (docs/speculative.md §2): row `row` of a
    DraftBatch. A batched extend hands each request a row of one batch (no per-request tensors), and the
    next step takes that batch back whole when the requests come in the same order (`stack_states`)."""

    __slots__ = ("batch", "row")

    def __init__(self, topk_p: torch.Tensor, topk_idx: torch.Tensor, hidden: torch.Tensor) -> None:
        # topk_p [k] fp32, topk_idx [k] int64, hidden [H]
        self.batch = DraftBatch(topk_p[None], topk_idx[None], hidden[None])
        self.row = 0

    @classmethod
    def of(cls, batch: DraftBatch, row: int) -> DraftState:
        state = cls.__new__(cls)
        state.batch, state.row = batch, row
        return state

    @property
    def topk_p(self) -> torch.Tensor:  # [k] fp32
        return self.batch.topk_p[self.row]

    @property
    def topk_idx(self) -> torch.Tensor:  # [k] int64
        return self.batch.topk_idx[self.row]

    @property
    def hidden(self) -> torch.Tensor:  # [H]
        return self.batch.hidden[self.row]


def draft_topk(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(top-k draft probabilities [R, k] fp32, their tokens [R, k] int64) of draft logits [R, V].
    k = 1 (a chain): the largest probability of the softmax is 1 / sum(exp(l - max)), so one max and
    one sum, with no [R, V] probabilities written and no radix select (~14 launches a call otherwise);
    ties go to the lowest id, as the target's greedy argmax."""
    lf = logits.float()
    if k == 1:
        top, idx = lf.max(dim=-1, keepdim=True)
        return torch.exp(lf - top).sum(dim=-1, keepdim=True).reciprocal(), idx
    return torch.softmax(lf, dim=-1).topk(k, dim=-1)


def draft_states(logits: torch.Tensor, hidden: torch.Tensor, k: int) -> list[DraftState]:
    """logits [R, V] fp32 and hidden [R, H] of the last draft position of each request."""
    p, idx = draft_topk(logits, k)
    batch = DraftBatch(p, idx, hidden)
    return [DraftState.of(batch, i) for i in range(logits.shape[0])]


def stack_states(states: Sequence[DraftState], rows: torch.Tensor | None = None) -> DraftBatch:
    """The DraftBatch of `states` in order. No copy when they are rows 0..B-1 of one batch; one gather
    when they are other rows of one batch (`rows`: their row indices on the device, if the caller has
    them there already); else one concatenation per field."""
    first = states[0].batch
    if all(s.batch is first for s in states):
        if len(states) == first.topk_p.shape[0] and all(s.row == i for i, s in enumerate(states)):
            return first
        if rows is None:
            rows = torch.tensor([s.row for s in states], device=first.topk_p.device)
        return DraftBatch(*(t.index_select(0, rows) for t in first))
    return DraftBatch(*(torch.cat([s.batch[f][s.row:s.row + 1] for s in states]) for f in range(3)))
