"""Triton twins of the per-row ops in `reference.py`: rms_norm, fused_add_rms_norm, qk_norm_rope,
qk_norm_rope_store (the same plus the paged K/V write, one launch), silu_and_mul.

Same signatures and the same cast order as the reference (fp32 statistics, cast to the activation
dtype, then the weight multiply and the RoPE arithmetic in the activation dtype). rms_norm and
fused_add_rms_norm take the RMS statistic exactly as `reference.inv_rms` does (`_inv_rms`), so they
are bit-equal to their twins; the per-head norm of qk_norm_rope sums in fp32 and agrees to the last
bit in most elements and to one ulp elsewhere. Every kernel is dtype-generic (the
output dtype is read off the pointers); the CPU interpreter cannot do bf16 arithmetic, so the
interpreter tests run fp16 and fp32 while the GPU tests run bf16.

Invariants: the last dim of every tensor is contiguous (stride 1; the wrappers copy otherwise);
rows may be strided (q/k may be views of a fused qkv projection). Outputs are new tensors, except
qk_norm_rope_store's q, which is rotated in place (`ROPE_IN_PLACE`): a prefill's q is the largest
tensor the op touches, and without a q norm only its rotary half changes, so writing that half back
into the qkv projection's output halves the op's q bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from common.ops.pdl import pdl_kwargs, pdl_start
from common.ops.reference import RMS_SUM_BITS

_SUM_BITS = tl.constexpr(RMS_SUM_BITS)

# qk_norm_rope_store writes the new q over its input (its reference twin does the same); False keeps
# the earlier new-tensor output, for timing the two against each other.
ROPE_IN_PLACE = True


def _row_warps(block: int) -> int:
    # 16-byte vectors: 8 bf16 per thread per load; aim for ~4 vectors per thread
    return max(1, min(16, block // 256))


@triton.jit
def _inv_rms(xf, n, eps):
    """1 / sqrt(mean(xf^2) + eps) over every element of the fp32 tile xf (padding lanes 0; n real
    elements), bit-equal to `reference.inv_rms`: int64 sum of truncated scaled squares, IEEE fp64 tail."""
    amax = tl.max(tl.abs(xf))
    e = tl.minimum(tl.maximum(((amax.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 126, -100), 129)  # amax < 2^e
    y = xf * ((150 - e) << 23).to(tl.float32, bitcast=True)  # xf * 2^(23-e)
    total = tl.sum((y * y).to(tl.int64))
    unit = ((2 * e.to(tl.int64) - _SUM_BITS + 1023) << 52).to(tl.float64, bitcast=True)  # 2^(2e - 46)
    mean = total.to(tl.float64) * unit / n
    eps64 = tl.cast(eps, tl.float32).to(tl.float64)  # eps is taken in fp32
    return (1.0 / tl.sqrt(mean + eps64)).to(tl.float32)  # fp64 "/" and sqrt are IEEE


@triton.jit
def _combined(x_row, stride_k, cols, m, dt: tl.constexpr, ROWS: tl.constexpr):
    """Row x at cols; ROWS > 0: the sum of ROWS rows stride_k apart, added in fp32 in index order to
    +0.0 and cast once to dt, exactly as the fused MoE's combine does (`reference.combine_rows`)."""
    if ROWS == 0:
        return tl.load(x_row + cols, mask=m, other=0.0)
    acc = tl.zeros(cols.shape, dtype=tl.float32)
    for j in tl.static_range(ROWS):
        acc += tl.load(x_row + j * stride_k + cols, mask=m, other=0.0).to(tl.float32)
    return acc.to(dt)


@triton.jit
def _rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, res_out_ptr,
    H, stride_x, stride_xk, stride_r, stride_o, stride_ro, eps,
    HAS_RES: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    """One row per program: out = w * (s / rms(s)) with s = x (+ residual, rounded to x's dtype).
    ROWS > 0: x is ROWS rows a token (stride_xk apart: a fused MoE's rows, a split-K GEMM's slices),
    added up first."""
    pdl_start(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    m = offs < H
    x = _combined(x_ptr + row * stride_x, stride_xk, offs, m, res_out_ptr.dtype.element_ty, ROWS)
    if HAS_RES:
        r = tl.load(r_ptr + row * stride_r + offs, mask=m, other=0.0)
        x = (x + r).to(res_out_ptr.dtype.element_ty)  # the sum is rounded like the reference's
        tl.store(res_out_ptr + row * stride_ro + offs, x, mask=m)
    xf = x.to(tl.float32)
    inv = _inv_rms(xf, H, eps)
    dt = out_ptr.dtype.element_ty
    w = tl.load(w_ptr + offs, mask=m, other=0.0).to(dt)
    tl.store(out_ptr + row * stride_o + offs, (xf * inv).to(dt) * w, mask=m)


def _rows(t: torch.Tensor) -> torch.Tensor:
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _summand(x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, int, int, torch.dtype]:
    """x as the add + norm kernels read it, (x, ROWS, stride between rows, dtype of x + residual): a
    [T,H] x as rows (ROWS 0, torch's promoted dtype), or [T,k,H] rows to add up first (ROWS k, cast to
    residual's dtype, as their producer would have)."""
    if x.dim() == 3:
        x = x if x.stride(-1) == 1 else x.contiguous()
        return x, x.shape[1], x.stride(1), residual.dtype
    x = _rows(x)
    return x, 0, 0, torch.promote_types(x.dtype, residual.dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x[T,H] (any leading dims) normalised over H; returns a new [.., H] tensor in x.dtype."""
    x2 = _rows(x)  # [T,H]
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    n, h = x2.shape
    if n:
        block = triton.next_power_of_2(h)
        _rms_norm_kernel[(n,)](x2, x2, w, out, out, h, x2.stride(0), 0, 0, out.stride(0), 0, eps,
                               HAS_RES=False, ROWS=0, BLOCK=block, num_warps=_row_warps(block),
                               **pdl_kwargs(x.device))
    return out.view(x.shape)


def fused_add_rms_norm(
    x: torch.Tensor,  # [T,H]
    residual: torch.Tensor,  # [T,H]
    w: torch.Tensor,  # [H]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one pass; the inputs are not modified. x [T,k,H]: rows
    to add up in the kernel (to residual's dtype) before the add: a fused MoE's rows, a split-K
    GEMM's slices."""
    r2 = _rows(residual)
    x2, rows, stride_k, dt = _summand(x, residual)
    n, h = r2.shape
    out = torch.empty((n, h), dtype=dt, device=x.device)
    new_res = torch.empty((n, h), dtype=dt, device=x.device)
    if n:
        block = triton.next_power_of_2(h)
        _rms_norm_kernel[(n,)](x2, r2, w, out, new_res, h, x2.stride(0), stride_k, r2.stride(0), out.stride(0),
                               new_res.stride(0), eps, HAS_RES=True, ROWS=rows, BLOCK=block,
                               num_warps=_row_warps(block), **pdl_kwargs(x.device))
    return out.view(residual.shape), new_res.view(residual.shape)


@triton.jit
def _norm_rope_heads(
    src, dst, w_ptr, heads, h0, stride_h, stride_dh, cos, sin, eps,
    D: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr, HAS_W: tl.constexpr,
    BH: tl.constexpr, BHALF: tl.constexpr, BREST: tl.constexpr, SAME: tl.constexpr,
):
    """Heads [h0, h0+BH) of one token: optional per-head RMSNorm over D, then NeoX RoPE on the
    first 2*HALF dims; dims [2*HALF, D) pass through (normed). src/dst point at the token row; SAME:
    dst is src (in place), so unnormed pass-through dims are neither read nor written."""
    hs = h0 + tl.arange(0, BH)  # [BH]
    j = tl.arange(0, BHALF)  # [BHALF]
    jr = tl.arange(0, BREST)  # [BREST]
    mh = hs < heads
    m1 = mh[:, None] & (j < HALF)[None, :]
    mr = mh[:, None] & (jr < REST)[None, :]
    p1 = src + hs[:, None] * stride_h + j[None, :]
    pr = src + hs[:, None] * stride_h + 2 * HALF + jr[None, :]
    x1 = tl.load(p1, mask=m1, other=0.0)  # [BH,BHALF]
    x2 = tl.load(p1 + HALF, mask=m1, other=0.0)
    dt = dst.dtype.element_ty
    if HAS_W or not SAME:
        xr = tl.load(pr, mask=mr, other=0.0)  # [BH,BREST]
    if HAS_W:
        f1, f2, fr = x1.to(tl.float32), x2.to(tl.float32), xr.to(tl.float32)
        ss = tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1) + tl.sum(fr * fr, axis=1)
        inv = tl.rsqrt(ss / D + eps)[:, None]  # [BH,1]
        w1 = tl.load(w_ptr + j, mask=j < HALF, other=0.0).to(dt)[None, :]
        w2 = tl.load(w_ptr + HALF + j, mask=j < HALF, other=0.0).to(dt)[None, :]
        wr = tl.load(w_ptr + 2 * HALF + jr, mask=jr < REST, other=0.0).to(dt)[None, :]
        x1 = (f1 * inv).to(dt) * w1
        x2 = (f2 * inv).to(dt) * w2
        xr = (fr * inv).to(dt) * wr
    x1 = x1.to(dt)
    x2 = x2.to(dt)
    o1 = (x1 * cos).to(dt) - (x2 * sin).to(dt)
    o2 = (x2 * cos).to(dt) + (x1 * sin).to(dt)
    q1 = dst + hs[:, None] * stride_dh + j[None, :]
    tl.store(q1, o1.to(dt), mask=m1)
    tl.store(q1 + HALF, o2.to(dt), mask=m1)
    if HAS_W or not SAME:
        tl.store(dst + hs[:, None] * stride_dh + 2 * HALF + jr[None, :], xr.to(dt), mask=mr)


@triton.jit
def _cos_sin_row(cs_ptr, pos_ptr, t, stride_cs, dt: tl.constexpr, HALF: tl.constexpr, BHALF: tl.constexpr):
    """Token t's RoPE cos and sin ([1, BHALF] each, fp32 table cast to the activation dtype)."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, BHALF)
    cos = tl.load(cs_ptr + pos * stride_cs + j, mask=j < HALF, other=0.0)
    sin = tl.load(cs_ptr + pos * stride_cs + HALF + j, mask=j < HALF, other=0.0)
    return cos.to(dt)[None, :], sin.to(dt)[None, :]


@triton.jit
def _qk_norm_rope_kernel(
    q_ptr, k_ptr, v_ptr, qo_ptr, kd_ptr, vd_ptr, slot_ptr, pos_ptr, cs_ptr, qw_ptr, kw_ptr,
    HQ, HK, S, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_qot, stride_qoh, stride_dp, stride_ds, stride_dh, stride_cs, eps,
    D: tl.constexpr, HALF: tl.constexpr, REST: tl.constexpr,
    HAS_QW: tl.constexpr, HAS_KW: tl.constexpr, PAGED: tl.constexpr, Q_IN_PLACE: tl.constexpr,
    BH: tl.constexpr, BHALF: tl.constexpr, BREST: tl.constexpr, BD: tl.constexpr, PDL: tl.constexpr,
):
    """grid (T, cdiv(HQ,BH) + cdiv(HK,BH) + PAGED): q head blocks -> qo; k head blocks normed and
    rotated into their destination row: PAGED, the paged cache at slots[t] (a negative slot writes no
    K/V) with a last block copying v into the cache; otherwise row t of ko (kd_ptr, page stride = row
    stride, S = 1)."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    nqb = tl.cdiv(HQ, BH)
    nkb = tl.cdiv(HK, BH)
    if PAGED:
        slot = tl.load(slot_ptr + t)
    else:
        slot = t
    dst_row = (slot // S) * stride_dp + (slot % S) * stride_ds
    if hb == nqb + nkb:  # PAGED only: v into the cache
        h = tl.arange(0, BH)
        d = tl.arange(0, BD)
        m = (h < HK)[:, None] & (d < D)[None, :] & (slot >= 0)
        v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=m)
        vd = vd_ptr + dst_row + h[:, None] * stride_dh + d[None, :]
        tl.store(vd, v.to(vd_ptr.dtype.element_ty), mask=m)
    else:
        cos, sin = _cos_sin_row(cs_ptr, pos_ptr, t, stride_cs, qo_ptr.dtype.element_ty, HALF, BHALF)
        if hb < nqb:
            _norm_rope_heads(q_ptr + t * stride_qt, qo_ptr + t * stride_qot, qw_ptr, HQ, hb * BH,
                             stride_qh, stride_qoh, cos, sin, eps, D, HALF, REST, HAS_QW, BH, BHALF, BREST,
                             Q_IN_PLACE)
        elif slot >= 0:
            _norm_rope_heads(k_ptr + t * stride_kt, kd_ptr + dst_row, kw_ptr, HK, (hb - nqb) * BH,
                             stride_kh, stride_dh, cos, sin, eps, D, HALF, REST, HAS_KW, BH, BHALF, BREST, False)


def _qk_norm_rope_launch(q, k, v, positions, cos_sin, rotary_dim, q_norm_w, k_norm_w, eps,  # type: ignore
                         k_dst, v_dst, slots, in_place=False):
    """Shared launcher. k_dst/v_dst: the paged caches [P,S,Hk,D] with `slots` [T] (v too), or, with
    slots None, k_dst = the new k [T,Hk,D] and no v. Returns the new q (in_place: q itself, rotated)."""
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    if v is not None and v.stride(-1) != 1:
        v = v.contiguous()
    if cos_sin.stride(-1) != 1:
        cos_sin = cos_sin.contiguous()
    n_tok, hq, d = q.shape
    hk = k.shape[1]
    half = rotary_dim // 2
    rest = d - rotary_dim
    qo = q if in_place else torch.empty((n_tok, hq, d), dtype=q.dtype, device=q.device)
    if n_tok == 0:
        return qo
    paged = slots is not None
    if paged:
        page_size, (stride_dp, stride_ds, stride_dh) = k_dst.shape[1], k_dst.stride()[:3]
    else:  # row t of k_dst: pages of one slot
        page_size, stride_dp, stride_ds, stride_dh = 1, k_dst.stride(0), 0, k_dst.stride(1)
    bh = min(16, triton.next_power_of_2(max(hq, hk)))
    grid = (n_tok, triton.cdiv(hq, bh) + triton.cdiv(hk, bh) + int(paged))
    _qk_norm_rope_kernel[grid](
        q, k, v if paged else k, qo, k_dst, v_dst if paged else k_dst, slots if paged else positions, positions,
        cos_sin, q_norm_w if q_norm_w is not None else q, k_norm_w if k_norm_w is not None else k,
        hq, hk, page_size, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        (v if paged else k).stride(0), (v if paged else k).stride(1),
        qo.stride(0), qo.stride(1), stride_dp, stride_ds, stride_dh, cos_sin.stride(0), eps,
        D=d, HALF=half, REST=rest, HAS_QW=q_norm_w is not None, HAS_KW=k_norm_w is not None, PAGED=paged,
        Q_IN_PLACE=in_place, BH=bh, BHALF=triton.next_power_of_2(max(half, 1)), BREST=triton.next_power_of_2(max(rest, 1)),
        BD=triton.next_power_of_2(d), num_warps=4, **pdl_kwargs(q.device),
    )
    return qo


def qk_norm_rope_store(
    q: torch.Tensor,  # [T,Hq,D]
    k: torch.Tensor,  # [T,Hk,D]
    v: torch.Tensor,  # [T,Hk,D]
    positions: torch.Tensor,  # [T] int64
    cos_sin: torch.Tensor,  # [max_pos, rot] fp32
    rotary_dim: int,
    q_norm_w: torch.Tensor | None,
    k_norm_w: torch.Tensor | None,
    eps: float,
    k_cache: torch.Tensor,  # [P,S,Hk,D]
    v_cache: torch.Tensor,  # [P,S,Hk,D]
    slots: torch.Tensor,  # [T] int64
) -> torch.Tensor:
    """qk_norm_rope, then store_kv of the new k and v, in one launch; returns the new q, written over q
    (a copy first where q's last dim is strided) unless ROPE_IN_PLACE is off."""
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("qk_norm_rope_store: k_cache and v_cache need the same strides and a contiguous "
                         "head dim")
    return _qk_norm_rope_launch(q, k, v, positions, cos_sin, rotary_dim, q_norm_w, k_norm_w, eps,
                                k_cache, v_cache, slots, in_place=ROPE_IN_PLACE)


def qk_norm_rope(
    q: torch.Tensor,  # [T,Hq,D]
    k: torch.Tensor,  # [T,Hk,D]
    positions: torch.Tensor,  # [T] int64
    cos_sin: torch.Tensor,  # [max_pos, rot] fp32
    rotary_dim: int,
    q_norm_w: torch.Tensor | None,  # [D]
    k_norm_w: torch.Tensor | None,  # [D]
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm (when weights are given) then NeoX partial RoPE; returns new (q, k)."""
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    qo = _qk_norm_rope_launch(q, k, None, positions, cos_sin, rotary_dim, q_norm_w, k_norm_w, eps,
                              ko, None, None)
    return qo, ko


@triton.jit
def _silu_mul(x_row, I, i, m):
    """silu(gate) * up at columns i (mask m) of one gate_up row, in its dtype (each product rounded
    to it, as the reference's two torch ops round); shared by silu_and_mul and its FP8 fusion."""
    dt = x_row.dtype.element_ty
    g = tl.load(x_row + i, mask=m, other=0.0).to(tl.float32)
    u = tl.load(x_row + I + i, mask=m, other=0.0)
    act = (g * tl.sigmoid(g)).to(dt)
    return (act * u).to(dt)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, I, stride_x, stride_o, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """grid (T, cdiv(I, BLOCK)): out[t] = silu(gate) * up."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = i < I
    tl.store(out_ptr + t * stride_o + i, _silu_mul(x_ptr + t * stride_x, I, i, m), mask=m)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    x = _rows(gate_up)
    n_tok, width = x.shape
    inter = width // 2
    out = torch.empty((n_tok, inter), dtype=x.dtype, device=x.device)
    if n_tok == 0:
        return out
    block = min(2048, triton.next_power_of_2(inter))
    _silu_and_mul_kernel[(n_tok, triton.cdiv(inter, block))](x, out, inter, x.stride(0), out.stride(0),
                                                             BLOCK=block, num_warps=_row_warps(block),
                                                             **pdl_kwargs(x.device))
    return out


__all__ = ["fused_add_rms_norm", "qk_norm_rope", "qk_norm_rope_store", "rms_norm", "silu_and_mul"]
