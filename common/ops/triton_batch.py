"""Triton twin of the CUDA-graph batch loads (`common.runtime.cuda_graphs.load_decode_batch` /
`load_tree_batch`): copy a step's batch into a graph bucket's static batch in one launch.

The torch twins issue one copy (and one fill) per field: 7-15 small launches, ~90 us of host time
on the H100 machine, all before the graph replay can start; at batch 1 the GPU sits idle for them.
Here one program per bucket row (sequence) copies that sequence's rows of every field and writes
the dummy-request padding for rows past the real batch, so the whole load is one launch, and a
repeated load goes straight to the compiled kernel's launcher (Triton's per-call argument binding
of 25 arguments cost about as much host time as the copies it replaces).

Padding (same as the twins): token 0, position 0, slot 0, prefix 0, seq_len `seq_pad` (1 for a
decode step, the window w for a tree batch), page table zeros past the batch's width and for
padded rows, mask bits True, a padded sequence's logit row from `pad_rows`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_ARGS = ("ids_s", "pos_s", "slot_s", "pre_s", "seq_s", "tab_s", "mask_s", "rows_s", "ids_d", "pos_d", "slot_d", "pre_d",
         "seq_d", "tab_d", "mask_d", "rows_d", "pad_rows", "n", "q", "qw", "width", "max_pages", "seq_pad", "stride_ts",
         "stride_td")


# Nothing is specialised on values or alignment, so one compiled kernel per (constexprs, dtypes) is
# valid for every call and can be launched without Triton's per-call argument binding (below).
@triton.jit(do_not_specialize=list(_ARGS[17:]), do_not_specialize_on_alignment=list(_ARGS[:17]))
def _load_batch_kernel(
    ids_s, pos_s, slot_s, pre_s, seq_s, tab_s, mask_s, rows_s,
    ids_d, pos_d, slot_d, pre_d, seq_d, tab_d, mask_d, rows_d, pad_rows,
    n, q, qw, width, max_pages, seq_pad, stride_ts, stride_td,
    Q_PAD: tl.constexpr, BP: tl.constexpr, BW: tl.constexpr, HAS_MASK: tl.constexpr, SEQ_ROWS: tl.constexpr,
):
    """grid (bucket,): sequence b's q token rows, lengths, page-table row, q*w mask bits and (SEQ_ROWS)
    logit row; b >= n gets the padding."""
    b = tl.program_id(0)
    real = b < n
    j = tl.arange(0, Q_PAD)
    r = b * q + j
    rm = j < q
    tl.store(ids_d + r, tl.load(ids_s + r, mask=rm & real, other=0), mask=rm)
    tl.store(pos_d + r, tl.load(pos_s + r, mask=rm & real, other=0), mask=rm)
    tl.store(slot_d + r, tl.load(slot_s + r, mask=rm & real, other=0), mask=rm)
    one = tl.arange(0, 1)  # lengths as 1-element vectors (scalar masked loads are not portable)
    tl.store(pre_d + b + one, tl.load(pre_s + b + one, mask=real, other=0))
    tl.store(seq_d + b + one, tl.load(seq_s + b + one, mask=real, other=seq_pad))
    for c0 in range(0, max_pages, BP):
        c = c0 + tl.arange(0, BP)
        page = tl.load(tab_s + b * stride_ts + c, mask=real & (c < width), other=0)
        tl.store(tab_d + b * stride_td + c, page, mask=c < max_pages)
    if HAS_MASK:
        for c0 in range(0, qw, BW):
            c = c0 + tl.arange(0, BW)
            bits = tl.load(mask_s + b * qw + c, mask=real & (c < qw), other=1)
            tl.store(mask_d + b * qw + c, bits, mask=c < qw)
    if SEQ_ROWS:
        row = tl.load(rows_s + b + one, mask=real, other=0)
        tl.store(rows_d + b + one, tl.where(real, row, tl.load(pad_rows + b + one)))


def load_batch(static, batch, q: int, window: int, seq_pad: int,  # type: ignore[no-untyped-def]
               pad_rows: torch.Tensor | None) -> None:
    """Copy `batch` (n sequences x q queries) into the bucket's `static` ForwardBatch (same q; window w
    mask bits per query when the batch is masked). pad_rows: per-sequence logit rows of the padded
    sequences when the bucket loads logit_rows (one row per sequence), else None. Shapes are checked
    by the caller (cuda_graphs.load_decode_batch / load_tree_batch)."""
    n, bs = batch.num_seqs, static.num_seqs
    width, max_pages = batch.page_table.shape[1], static.page_table.shape[1]
    has_mask = static.mask is not None
    seq_rows = pad_rows is not None
    mask_s = batch.mask if has_mask else static.input_ids  # unused placeholders when absent
    mask_d = static.mask if has_mask else static.input_ids
    rows_s = batch.logit_rows if seq_rows else static.input_ids
    rows_d = static.logit_rows if seq_rows else static.input_ids
    qw = q * window
    consts = (triton.next_power_of_2(q), min(1024, triton.next_power_of_2(max(max_pages, 1))),
              min(1024, triton.next_power_of_2(max(qw, 1))), has_mask, seq_rows)  # Q_PAD, BP, BW, HAS_MASK, SEQ_ROWS
    args = (batch.input_ids, batch.positions, batch.out_slots, batch.prefix_lens, batch.seq_lens, batch.page_table,
            mask_s, rows_s,
            static.input_ids, static.positions, static.out_slots, static.prefix_lens, static.seq_lens,
            static.page_table, mask_d, rows_d, pad_rows if seq_rows else static.input_ids,
            n, q, qw, width, max_pages, seq_pad, batch.page_table.stride(0), static.page_table.stride(0), *consts)
    key = (*consts, *(a.dtype for a in args[:17]), batch.input_ids.device)
    compiled = _compiled.get(key)
    if compiled is not None:  # the launcher straight away: 36-40 us of host time per load instead of 76-79
        compiled[(bs, 1, 1)](*args)
        return
    compiled = _load_batch_kernel[(bs,)](*args, num_warps=1)
    if hasattr(compiled, "run") and batch.input_ids.is_cuda:  # (the CPU interpreter returns no kernel)
        _compiled[key] = compiled


_compiled: dict[tuple, object] = {}


__all__ = ["load_batch"]
