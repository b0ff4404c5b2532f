"""EAGLE draft state produced by an MTP draft-extend forward (prefill and decode both make it)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class DraftState:
    """What the next decode step needs from the draft (specs/eagle.md §4.1 step 3)."""

    topk_p: torch.Tensor  # [k] fp32 draft probabilities of the token after the pending one
    topk_idx: torch.Tensor  # [k] int64
    hidden: torch.Tensor  # [H] draft hidden (post shared_head.norm) at the last KV position


def draft_states(logits: torch.Tensor, hidden: torch.Tensor, k: int) -> list[DraftState]:
    """logits [R, V] fp32 and hidden [R, H] of the last draft position of each request."""
    probs = torch.softmax(logits.float(), dim=-1)
    p, idx = probs.topk(k, dim=-1)
    return [DraftState(p[i], idx[i], hidden[i]) for i in range(logits.shape[0])]
