"""Paged attention in plain torch: gathers each sequence's slots and runs masked softmax attention.

The CPU path and the oracle for the Triton kernel. Scores, softmax and the weighted sum are
computed in fp32 and cast once.
"""

from __future__ import annotations

import torch

from common.attention.base import head_amax, sequence_slots, visible_slots
from common.forward.batch import ForwardBatch


def paged_attention(
    q: torch.Tensor,  # [T,Hq,D]
    k_cache: torch.Tensor,  # [P,S,Hk,D]
    v_cache: torch.Tensor,  # [P,S,Hk,D]
    batch: ForwardBatch,
    scale: float,
    amax: torch.Tensor | None = None,  # [T,Hq] fp32: filled with each head's max |o|
) -> torch.Tensor:  # [T,Hq,D]
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    k_flat = k_cache.view(-1, num_kv_heads, head_dim)  # [P*S,Hk,D]
    v_flat = v_cache.view(-1, num_kv_heads, head_dim)
    out = torch.empty_like(q)
    start = 0
    for b, n_q in enumerate(batch.query_lens_host):
        slots = sequence_slots(batch, b)  # [N]
        k = k_flat[slots].float().transpose(0, 1)  # [Hk,N,D]
        v = v_flat[slots].float().transpose(0, 1)  # [Hk,N,D]
        qb = q[start : start + n_q].float().view(n_q, num_kv_heads, group, head_dim)
        qb = qb.permute(1, 2, 0, 3)  # [Hk,G,n_q,D]
        scores = torch.einsum("hgqd,hnd->hgqn", qb, k) * scale  # [Hk,G,n_q,N]
        scores = scores.masked_fill(~visible_slots(batch, b), float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        ob = torch.einsum("hgqn,hnd->hgqd", probs, v)  # [Hk,G,n_q,D]
        out[start : start + n_q] = ob.permute(2, 0, 1, 3).reshape(n_q, num_q_heads, head_dim).to(q.dtype)
        start += n_q
    if amax is not None:
        head_amax(out, amax)
    return out
