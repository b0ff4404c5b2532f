"""What every paged-attention backend computes, stated once.

A backend is a function `(q[T,Hq,D], k_cache[P,S,Hk,D], v_cache[P,S,Hk,D], batch, scale) -> [T,Hq,D]`
that runs after the new tokens' K/V were stored. Query i of sequence b attends over the slots
`visible_slots(batch, b)[i]` of that sequence, with GQA head sharing (query head j reads KV head
j // (Hq // Hk)) and softmax(scale * q.k) over the visible slots.
"""

from __future__ import annotations

from typing import Protocol

import torch

from common.forward.batch import ForwardBatch


class PagedAttentionFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,  # [T,Hq,D]
        k_cache: torch.Tensor,  # [P,S,Hk,D]
        v_cache: torch.Tensor,  # [P,S,Hk,D]
        batch: ForwardBatch,
        scale: float,
        amax: torch.Tensor | None = None,  # [T,Hq] fp32: filled with each (token, head)'s max |o|
    ) -> torch.Tensor: ...  # [T,Hq,D]


def head_amax(o: torch.Tensor, amax: torch.Tensor) -> None:
    """amax [T,Hq] fp32 = max |o| over each head's D values (o [T,Hq,D] as stored): the per-token
    quantiser's amax of the attention output is the max of a row's."""
    amax.copy_(o.abs().amax(dim=-1))


def visible_slots(batch: ForwardBatch, b: int) -> torch.Tensor:
    """[q_b, seq_len_b] bool on batch's device: which logical slots each query of sequence b sees."""
    q = batch.query_lens_host[b]
    prefix = batch.prefix_lens_host[b]
    seq_len = batch.seq_lens_host[b]
    window = seq_len - prefix
    device = batch.input_ids.device
    if batch.mask is None:
        col = torch.arange(window, device=device)[None, :]
        row = torch.arange(q, device=device)[:, None]
        in_window = col <= (window - q) + row  # causal: query i sees the slots up to its own
    else:
        start = int(batch.mask_start[b])
        in_window = batch.mask[start : start + q * window].view(q, window)
    return torch.cat((torch.ones(q, prefix, dtype=torch.bool, device=device), in_window), dim=1)


def sequence_slots(batch: ForwardBatch, b: int) -> torch.Tensor:
    """[seq_len_b] int64 physical flat slots of sequence b's logical slots 0 .. seq_len_b - 1."""
    logical = torch.arange(batch.seq_lens_host[b], device=batch.page_table.device)
    pages = batch.page_table[b].long()[logical // batch.page_size]
    return pages * batch.page_size + logical % batch.page_size
