"""Paged attention over a ForwardBatch: the torch reference everywhere, Triton on CUDA.

`paged_attention(q, k_cache, v_cache, batch, scale)` uses `common.attention.triton_paged` for CUDA
tensors when it imports and the ops backend is "auto" (so `common.ops.use_reference()` also forces
the reference attention); otherwise `torch_ref`. `paged_attention_quant` also returns the output
quantised for an FP8 o_proj (on CUDA the split-K merge kernel does it; elsewhere the quantiser op).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import torch

from common import ops
from common.attention import torch_ref
from common.attention.base import PagedAttentionFn
from common.forward.batch import ForwardBatch

_triton: list[ModuleType | None] = []


def _triton_backend(name: str = "paged_attention") -> Any:
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
) -> torch.Tensor:  # [T,Hq,D]
    return resolve(q.device)(q, k_cache, v_cache, batch, scale)


def paged_attention_quant(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, batch: ForwardBatch, scale: float, quant: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out [T,Hq,D], codes [T,Hq*D] e4m3, scales fp32): attention and its output quantised for an
    FP8 linear per token (quant 0) or per 1 x quant group, bit-equal to paged_attention followed by
    the quantiser op."""
    if q.device.type == "cuda" and ops.get_backend() == "auto":
        fn = _triton_backend("paged_attention_quant")
        if fn is not None:
            return fn(q, k_cache, v_cache, batch, scale, quant)
    out = resolve(q.device)(q, k_cache, v_cache, batch, scale)
    rows = out.view(out.shape[0], -1)
    return (out, *(ops.quant_fp8_per_token(rows) if quant == 0 else ops.quant_fp8_per_group(rows, quant)))


__all__ = ["paged_attention", "paged_attention_quant", "resolve"]
