"""Triton twin of `reference.apply_token_bitmask`: the structured-output token mask, in place.

One program per (row, block of BLOCK tokens): it reads the block's BLOCK / 32 mask words and writes
-inf only where a bit is 0, so a row that allows everything costs one read of its words. No host
sync and fixed shapes, so it may run inside a captured CUDA graph (the mask being an input buffer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 4096


@triton.jit
def _apply_bitmask_kernel(logits_ptr, mask_ptr, vocab, logits_stride, mask_stride, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < vocab
    words = tl.load(mask_ptr + row * mask_stride + offs // 32, mask=inside, other=-1)
    keep = ((words >> (offs % 32)) & 1) != 0
    neg = tl.full([BLOCK], float("-inf"), logits_ptr.dtype.element_ty)
    tl.store(logits_ptr + row * logits_stride + offs, neg, mask=inside & ~keep)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """logits [R,V] float (last dim contiguous), bitmask [R,ceil(V/32)] int32 on the same device."""
    rows, vocab = logits.shape
    assert logits.stride(1) == 1, "apply_token_bitmask: the vocabulary dim must be contiguous"
    assert bitmask.shape == (rows, (vocab + 31) // 32) and bitmask.dtype == torch.int32, "bitmask shape/dtype"
    bitmask = bitmask.contiguous()
    if rows:
        block = min(_BLOCK, triton.next_power_of_2(vocab))
        _apply_bitmask_kernel[(rows, triton.cdiv(vocab, block))](logits, bitmask, vocab, logits.stride(0),
                                                                bitmask.stride(0), BLOCK=block)
    return logits
