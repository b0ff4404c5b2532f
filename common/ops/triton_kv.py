"""Triton twin of `reference.store_kv`: write each new token's K and V into its paged slot.

Invariants: slots are physical flat slots (page * S + offset, int64); page 0 is the dummy page that
padded rows (CUDA-graph padding) write to, so every slot is in range and no row is skipped. A
negative slot is skipped (nothing is written), which the reference would reject; the twin never
relies on it. k/v may be strided views (e.g. of a fused qkv projection) as long as the head dim is
contiguous; the caches may be strided per page/slot/head (e.g. a KVPool layer view).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
    HK, S,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cp, stride_cs, stride_ch,
    D: tl.constexpr, BH: tl.constexpr, BD: tl.constexpr,
):
    """grid (T, cdiv(HK, BH)): one token's heads [h0, h0+BH) of K and of V; 16-byte rows along D."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * BH + tl.arange(0, BH)  # [BH]
    d = tl.arange(0, BD)  # [BD]
    slot = tl.load(slot_ptr + t)
    page = slot // S
    off = slot % S
    m = (h < HK)[:, None] & (d < D)[None, :] & (slot >= 0)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=m)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=m)
    dst = page * stride_cp + off * stride_cs + h[:, None] * stride_ch + d[None, :]
    tl.store(kc_ptr + dst, k.to(kc_ptr.dtype.element_ty), mask=m)
    tl.store(vc_ptr + dst, v.to(vc_ptr.dtype.element_ty), mask=m)


def store_kv(
    k_cache: torch.Tensor,  # [P,S,Hk,D]
    v_cache: torch.Tensor,  # [P,S,Hk,D]
    k: torch.Tensor,  # [T,Hk,D]
    v: torch.Tensor,  # [T,Hk,D]
    slots: torch.Tensor,  # [T] int64
) -> None:
    """In place: k_cache/v_cache at flat slot slots[t] <- k[t]/v[t] (cast to the cache dtype)."""
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("store_kv: k_cache and v_cache need the same strides and a contiguous head dim")
    n_tok, hk, d = k.shape
    if n_tok == 0:
        return
    bd = triton.next_power_of_2(d)
    bh = max(1, min(triton.next_power_of_2(hk), 4096 // bd))
    grid = (n_tok, triton.cdiv(hk, bh))
    _store_kv_kernel[grid](
        k, v, k_cache, v_cache, slots, hk, k_cache.shape[1],
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        D=d, BH=bh, BD=bd, num_warps=4,
    )


__all__ = ["store_kv"]
