"""Paged attention over a ForwardBatch: the torch reference everywhere, Triton on CUDA.

`paged_attention(q, k_cache, v_cache, batch, scale)` uses `common.attention.triton_paged` for CUDA
tensors when it imports and the ops backend is "auto" (so `common.ops.use_reference()` also forces
the reference attention); otherwise `torch_ref`. `rope_store_attention` is a layer's whole attention
from its new q, k, v: `ops.qk_norm_rope_store` into the cache, then `paged_attention`; the Triton
backend runs both in one launch for small-query batches.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType

import torch

from common import ops
from common.attention import torch_ref
from common.attention.base import PagedAttentionFn
from common.forward.batch import ForwardBatch

_triton: list[ModuleType | None] = []


def _triton_backend(name: str = "paged_attention") -> Callable | None:
    if not _triton:
        try:
            _triton.append(importlib.import_module("common.attention.triton_paged"))
        except ImportError:
            _triton.append(None)
    module = _triton[0]
    return getattr(module, name, None) if module is not None else None


def resolve(device: torch.device) -> PagedAttentionFn:
    if device.type == "cuda" and ops.get_backend() == "auto":
        fn = _triton_backend()
        if fn is not None:
            return fn
    return torch_ref.paged_attention


def paged_attention(
    q: torch.Tensor,  # [T,Hq,D]
    k_cache: torch.Tensor,  # [P,S,Hk,D]
    v_cache: torch.Tensor,  # [P,S,Hk,D]
    batch: ForwardBatch,
    scale: float,
    amax: torch.Tensor | None = None,  # [T,Hq] fp32: filled with each (token, head)'s max |o|
) -> torch.Tensor:  # [T,Hq,D]
    """amax, given: each (token, head)'s max |o| as returned, for the per-token quantiser of o's
    consumer (the Triton backend's split merge writes it as it stores o)."""
    return resolve(q.device)(q, k_cache, v_cache, batch, scale, amax)


def rope_store_attention(
    q: torch.Tensor,  # [T,Hq,D] before norm and RoPE
    k: torch.Tensor,  # [T,Hk,D] before norm and RoPE
    v: torch.Tensor,  # [T,Hk,D]
    positions: torch.Tensor,  # [T] int64
    cos_sin: torch.Tensor,  # [max_pos, rot] fp32
    rotary_dim: int,
    q_norm_w: torch.Tensor | None,
    k_norm_w: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,  # [P,S,Hk,D]
    v_cache: torch.Tensor,  # [P,S,Hk,D]
    batch: ForwardBatch,
    scale: float,
    amax: torch.Tensor | None = None,
) -> torch.Tensor:  # [T,Hq,D]
    """The new tokens' q and k normed and rotated, their k and v stored at batch.out_slots, then
    paged_attention over the cache. q may be written over (the two-launch path rotates it in place)."""
    if q.device.type == "cuda" and ops.get_backend() == "auto":
        fn = _triton_backend("rope_store_attention")
        if fn is not None:
            return fn(q, k, v, positions, cos_sin, rotary_dim, q_norm_w, k_norm_w, eps, k_cache, v_cache, batch,
                      scale, amax)
    q = ops.qk_norm_rope_store(q, k, v, positions, cos_sin, rotary_dim, q_norm_w, k_norm_w, eps, k_cache, v_cache,
                               batch.out_slots)
    return paged_attention(q, k_cache, v_cache, batch, scale, amax)


__all__ = ["paged_attention", "resolve", "rope_store_attention"]
