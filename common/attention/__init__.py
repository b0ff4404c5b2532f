"""Paged attention over a ForwardBatch: the torch reference everywhere, Triton on CUDA.

`paged_attention(q, k_cache, v_cache, batch, scale)` uses `common.attention.triton_paged` for CUDA
tensors when it imports and the ops backend is "auto" (so `common.ops.use_reference()` also forces
the reference attention); otherwise `torch_ref`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from common import ops
from common.attention import torch_ref
from common.attention.base import PagedAttentionFn
from common.forward.batch import ForwardBatch

_triton: list[ModuleType | None] = []


def _triton_backend() -> PagedAttentionFn | None:
    if not _triton:
        try:
            _triton.append(importlib.import_module("common.attention.triton_paged"))
        except ImportError:
            _triton.append(None)
    module = _triton[0]
    return getattr(module, "paged_attention", None) if module is not None else None


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


__all__ = ["paged_attention", "resolve"]
