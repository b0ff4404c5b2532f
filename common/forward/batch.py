"""The one batch description for every forward kind.

Prefill with a cached prefix (chunked prefill), decode, EAGLE verify over a token tree, and draft
steps all become the same thing: B sequences, each contributing q_b new query tokens.

Per sequence b:
- its KV lives in *logical* slots 0 .. seq_len_b-1, mapped to physical pages by page_table[b]
  (physical flat slot = page * page_size + offset; page 0 is never handed out and serves as the
  dummy page for padding);
- slots [0, prefix_len_b) are fully visible to every one of its queries;
- its q_b query tokens write their K/V to the *last* q_b logical slots, seq_len_b - q_b + i;
- visibility of the slots [prefix_len_b, seq_len_b) is causal (query i sees slot
  seq_len_b - q_b + j for j <= i) unless `mask` is given, in which case sequence b owns a
  row-major block of q_b x (seq_len_b - prefix_len_b) booleans (row = query, column = slot
  prefix_len_b + c).

`positions` are RoPE positions and are independent of slots: a verify tree node at depth d sits
at position L + d while its KV slot is L + node_index.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import torch

_SLOTS_VECTOR_MIN = 256  # query tokens from which ForwardBatch.build computes a sequence's slots by torch


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Host -> device without waiting: on CUDA a pinned, non-blocking copy (a plain `.to(cuda)` of
    pageable memory synchronises the stream); elsewhere an ordinary copy."""
    device = torch.device(device)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _append_page_rows(buf: array, pages: Sequence[Sequence[int]], need: Sequence[int], width: int) -> array:
    """buf (int64) + a [len(pages), width] page table: row b = the first need[b] of pages[b], 0-padded
    (the dummy page). Array extends run in C: a batch's table costs a few µs a row, not a Python
    int() per page."""
    pad = array("q", bytes(8 * width))
    for p, k in zip(pages, need):
        buf.extend(p[:k])
        buf.extend(pad[: width - k])
    return buf


@dataclass(frozen=True)
class SeqSpec:
    """Host-side description of one sequence's part of a forward (builder input)."""

    input_ids: Sequence[int]  # q_b new tokens
    positions: Sequence[int]  # q_b RoPE positions
    seq_len: int  # logical KV length after this forward (includes the q_b new tokens)
    pages: Sequence[int]  # physical pages covering logical slots [0, seq_len)
    prefix_len: int | None = None  # fully visible slots; default seq_len - q_b
    mask: torch.Tensor | None = None  # [q_b, seq_len - prefix_len] bool, None = causal
    logit_rows: Sequence[int] | None = None  # indices into this sequence's queries; default: last


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    query_start: torch.Tensor  # [B+1] int32, cumulative q_b
    prefix_lens: torch.Tensor  # [B] int32
    seq_lens: torch.Tensor  # [B] int32
    page_table: torch.Tensor  # [B, max_pages] int32 (padded with 0 = dummy page)
    out_slots: torch.Tensor  # [T] int64 physical flat slot each query token writes its K/V to
    logit_rows: torch.Tensor  # [R] int64 flat token rows whose logits are wanted
    page_size: int
    mask: torch.Tensor | None = None  # [sum_b q_b * (seq_len_b - prefix_len_b)] bool
    mask_start: torch.Tensor | None = None  # [B+1] int64 offsets of each sequence's mask block
    # host copies for kernels that need launch-time sizes and for the CPU reference
    query_lens_host: tuple[int, ...] = ()
    prefix_lens_host: tuple[int, ...] = ()
    seq_lens_host: tuple[int, ...] = ()
    # build() only: per sequence, its first page when the pages covering [0, seq_len) are consecutive
    # (then its K/V is one slice of the pool: a view, not a gather), else -1
    run_start_host: tuple[int, ...] = ()

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_host, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_host, default=0)

    @property
    def is_decode(self) -> bool:
        """One causal query per sequence (plain decode step)."""
        return self.mask is None and all(q == 1 for q in self.query_lens_host)

    @classmethod
    def decode(cls, tokens: Sequence[int], kv_lens: Sequence[int], pages: Sequence[Sequence[int]], page_size: int,
               device: torch.device | str = "cpu") -> ForwardBatch:
        """A plain decode step without per-sequence tensors: sequence b feeds tokens[b] at RoPE position
        and logical slot kv_lens[b] (seq_len kv_lens[b] + 1). Same batch as build() with
        SeqSpec([t], [L], L + 1, pages[:L // page_size + 1]); the page table holds only the pages
        the step reads. All fields travel in one host->device copy (pinned and non-blocking on CUDA)."""
        n = len(tokens)
        if n == 0 or len(kv_lens) != n or len(pages) != n:
            raise ValueError(f"decode batch: {n} tokens, {len(kv_lens)} kv lengths, {len(pages)} page lists")
        need = [kv // page_size + 1 for kv in kv_lens]
        for b, (kv, k) in enumerate(zip(kv_lens, need)):
            if kv < 0 or len(pages[b]) < k:
                raise ValueError(f"sequence {b}: {len(pages[b])} pages cannot hold {kv + 1} slots")
        width = max(need)
        slots = [int(p[kv // page_size]) * page_size + kv % page_size for p, kv in zip(pages, kv_lens)]
        seq_lens = [kv + 1 for kv in kv_lens]
        # layout: ids | positions (= prefix lens) | slots | query_start | seq_lens | logit_rows | table
        buf = array("q", tokens)
        for part in (kv_lens, slots, range(n + 1), seq_lens, range(n)):
            buf.extend(part)
        host = torch.frombuffer(_append_page_rows(buf, pages, need, width), dtype=torch.int64)
        dev = torch.device(device)
        flat = to_device(host, dev)
        i32 = torch.int32
        return cls(
            input_ids=flat[:n],
            positions=flat[n:2 * n],
            query_start=flat[3 * n:4 * n + 1].to(i32),
            prefix_lens=flat[n:2 * n].to(i32),
            seq_lens=flat[4 * n + 1:5 * n + 1].to(i32),
            page_table=flat[6 * n + 1:].view(n, width).to(i32),
            out_slots=flat[2 * n:3 * n],
            logit_rows=flat[5 * n + 1:6 * n + 1],
            page_size=page_size,
            query_lens_host=(1,) * n,
            prefix_lens_host=tuple(int(kv) for kv in kv_lens),
            seq_lens_host=tuple(seq_lens),
        )

    @classmethod
    def tree(cls, tokens: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor, prefix_lens: Sequence[int],
             pages: Sequence[Sequence[int]], page_size: int) -> ForwardBatch:
        """q masked queries per sequence over a window of w slots (EAGLE verify: q = w = N; draft level l:
        q = k, w = (l+1)k), without a host copy of the device tensors.

        tokens [B, q] int64, depth [B, q] int64 (RoPE position = prefix_lens[b] + depth), mask [B, q, w]
        bool: all on the batch's device. Sequence b has prefix_len L_b = prefix_lens[b], seq_len L_b + w;
        query i writes logical slot L_b + w - q + i; every query's logits are wanted. Same batch as build()
        with SeqSpec(tokens[b], L_b + depth[b], L_b + w, pages[b][:need], prefix_len=L_b, mask=mask[b],
        logit_rows=range(q)); the page table holds only the `need` pages the forward touches. Lengths
        and page table travel in one host->device copy; slots are gathered on the device."""
        w = mask.shape[-1]
        return cls.tree_in(TreeLayout.build(prefix_lens, pages, w, page_size, tokens.device), tokens, depth, mask)

    @classmethod
    def tree_in(cls, layout: TreeLayout, tokens: torch.Tensor, depth: torch.Tensor, mask: torch.Tensor,
                logit_rows: torch.Tensor | None = None) -> ForwardBatch:
        """`tree()` over a TreeLayout built once for several masked forwards (window w <= layout.window):
        no host work and no copy. The page table is the layout's (it may cover slots past L_b + w).
        logit_rows [R] int64 on the device: the rows whose logits are wanted (default every query)."""
        n, q = tokens.shape
        w = mask.shape[-1]
        if tuple(depth.shape) != (n, q) or tuple(mask.shape) != (n, q, w) or q > w:
            raise ValueError(f"tree batch: tokens {tuple(tokens.shape)}, depth {tuple(depth.shape)}, "
                             f"mask {tuple(mask.shape)}")
        if n != layout.num_seqs or w > layout.window:
            raise ValueError(f"tree batch of {n} sequences x {w} slots does not fit a layout of "
                             f"{layout.num_seqs} x {layout.window}")
        dev = tokens.device
        return cls(
            input_ids=tokens.reshape(-1).long(),
            positions=(layout.prefix[:, None] + depth).reshape(-1),
            query_start=torch.arange(0, (n + 1) * q, q, dtype=torch.int32, device=dev),
            prefix_lens=layout.prefix32,
            seq_lens=(layout.prefix32 + w),
            page_table=layout.page_table,
            out_slots=layout.window_slots[:, w - q:w].reshape(-1),
            logit_rows=torch.arange(n * q, device=dev) if logit_rows is None else logit_rows,
            page_size=layout.page_size,
            mask=mask.reshape(-1).to(torch.bool),
            mask_start=torch.arange(0, (n + 1) * q * w, q * w, dtype=torch.int64, device=dev),
            query_lens_host=(q,) * n,
            prefix_lens_host=layout.prefix_lens_host,
            seq_lens_host=tuple(p + w for p in layout.prefix_lens_host),
        )

    @classmethod
    def build(cls, seqs: Sequence[SeqSpec], page_size: int, device: torch.device | str = "cpu") -> ForwardBatch:
        """Any mix of sequences (module docstring). Token ids, positions, slots, lengths, logit rows and
        the page table travel in one host->device copy (pinned and non-blocking on CUDA), built by array
        extends (an 8K-token prompt is a few hundred page runs, not 8K Python ints); masks in a second."""
        n = len(seqs)
        ids, pos, slots, rows = array("q"), array("q"), array("q"), array("q")
        qstart, prefix, seqlen, runs, row_pages = [0], [], [], [], []
        masks: list[torch.Tensor] = []
        mstart = [0]
        any_mask = any(s.mask is not None for s in seqs)
        max_pages = max((len(s.pages) for s in seqs), default=1) or 1
        for b, s in enumerate(seqs):
            q = len(s.input_ids)
            if len(s.positions) != q:
                raise ValueError(f"sequence {b}: {q} input ids but {len(s.positions)} positions")
            if q == 0:
                raise ValueError(f"sequence {b}: no query tokens")
            if s.seq_len < q:
                raise ValueError(f"sequence {b}: seq_len {s.seq_len} < query length {q}")
            need_pages = -(-s.seq_len // page_size)
            if len(s.pages) < need_pages:
                raise ValueError(f"sequence {b}: {len(s.pages)} pages cannot hold {s.seq_len} slots")
            p = s.seq_len - q if s.prefix_len is None else s.prefix_len
            if not 0 <= p <= s.seq_len - q:
                raise ValueError(f"sequence {b}: prefix_len {p} must be in [0, seq_len - q]")
            base = len(ids)
            _extend_ints(ids, s.input_ids)
            _extend_ints(pos, s.positions)
            _extend_slots(slots, s.pages, s.seq_len - q, s.seq_len, page_size)
            qstart.append(qstart[-1] + q)
            prefix.append(p)
            seqlen.append(s.seq_len)
            row_pages.append(len(s.pages))  # the table row holds every page given
            runs.append(_run_start(s.pages, need_pages))
            for r in (s.logit_rows if s.logit_rows is not None else (q - 1,)):
                if not 0 <= r < q:
                    raise ValueError(f"sequence {b}: logit row {r} outside its {q} queries")
                rows.append(base + int(r))
            if any_mask:
                cols = s.seq_len - p
                if s.mask is None:
                    # causal over the visible window
                    qi = torch.arange(q).unsqueeze(1)
                    cj = torch.arange(cols).unsqueeze(0)
                    m = cj <= (cols - q) + qi
                else:
                    m = s.mask.to(torch.bool).cpu()
                    if tuple(m.shape) != (q, cols):
                        raise ValueError(f"sequence {b}: mask shape {tuple(m.shape)} != ({q}, {cols})")
                masks.append(m.reshape(-1))
                mstart.append(mstart[-1] + q * cols)
        t, r = len(ids), len(rows)
        # layout: ids | positions | slots | logit rows | query_start | prefix lens | seq lens | table
        buf = ids
        for part in (pos, slots, rows, qstart, prefix, seqlen):
            buf.extend(part)
        host = torch.frombuffer(_append_page_rows(buf, [s.pages for s in seqs], row_pages, max_pages), dtype=torch.int64)
        dev = torch.device(device)
        flat = to_device(host, dev)
        o = 3 * t + r  # query_start
        i32 = torch.int32
        return cls(
            input_ids=flat[:t],
            positions=flat[t:2 * t],
            query_start=flat[o:o + n + 1].to(i32),
            prefix_lens=flat[o + n + 1:o + 2 * n + 1].to(i32),
            seq_lens=flat[o + 2 * n + 1:o + 3 * n + 1].to(i32),
            page_table=flat[o + 3 * n + 1:].view(n, max_pages).to(i32),
            out_slots=flat[2 * t:3 * t],
            logit_rows=flat[3 * t:o],
            page_size=page_size,
            mask=to_device(torch.cat(masks), dev) if any_mask else None,
            mask_start=to_device(torch.tensor(mstart, dtype=torch.int64), dev) if any_mask else None,
            query_lens_host=tuple(qstart[i + 1] - qstart[i] for i in range(n)),
            prefix_lens_host=tuple(prefix),
            seq_lens_host=tuple(seqlen),
            run_start_host=tuple(runs),
        )


def _extend_ints(buf: array, values: Sequence[int]) -> None:
    """buf += values: a C loop for ints and ranges; element by element for other integer types (e.g. a
    tensor's)."""
    try:
        buf.extend(values)
    except TypeError:
        buf.extend(int(v) for v in values)


def _extend_slots(buf: array, pages: Sequence[int], first: int, last: int, page_size: int) -> None:
    """buf += the physical flat slots of logical slots [first, last): one range per page touched, or
    for a long run (a prompt chunk) every page's slots at once through torch."""
    if last - first >= _SLOTS_VECTOR_MIN:
        p0, p1 = first // page_size, (last - 1) // page_size + 1
        base = torch.as_tensor(pages[p0:p1], dtype=torch.int64)[:, None] * page_size
        flat = (base + torch.arange(page_size)).reshape(-1)[first - p0 * page_size:last - p0 * page_size]
        buf.frombytes(flat.numpy().tobytes())
        return
    logical = first
    while logical < last:
        page, off = divmod(logical, page_size)
        take = min(page_size - off, last - logical)
        start = int(pages[page]) * page_size + off
        buf.extend(range(start, start + take))
        logical += take


def _run_start(pages: Sequence[int], k: int) -> int:
    """pages[0] when pages[:k] are consecutive (their K/V is one slice of the pool), else -1."""
    if k == 0:
        return -1
    first = int(pages[0])
    if int(pages[k - 1]) - first != k - 1:
        return -1
    return first if all(int(p) == first + i for i, p in enumerate(pages[:k])) else -1


@dataclass(frozen=True)
class TreeLayout:
    """Lengths and pages of B sequences, on the device once, for the masked forwards of one EAGLE step
    (`ForwardBatch.tree_in`): sequence b has prefix L_b and owns logical slots [L_b, L_b + window).

    Built with one host->device copy (pinned and non-blocking on CUDA) that can carry caller rows
    along (`extra`), so a step needs no other host->device transfer."""

    prefix: torch.Tensor  # [B] int64 L_b
    prefix32: torch.Tensor  # [B] int32 L_b
    page_table: torch.Tensor  # [B, width] int32, the pages of logical slots [0, L_b + window), 0-padded
    window_slots: torch.Tensor  # [B, window] int64 physical flat slot of logical slot L_b + c
    extra: torch.Tensor  # [E, B] int64 the caller's rows
    prefix_lens_host: tuple[int, ...]
    window: int
    page_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.prefix_lens_host)

    @classmethod
    def build(cls, prefix_lens: Sequence[int], pages: Sequence[Sequence[int]], window: int, page_size: int,
              device: torch.device | str = "cpu", extra: Sequence[Sequence[int]] = ()) -> TreeLayout:
        n = len(prefix_lens)
        if n == 0 or len(pages) != n or window < 1 or any(len(e) != n for e in extra):
            raise ValueError(f"tree layout: {n} prefix lengths, {len(pages)} page lists, window {window}, "
                             f"extra rows of {[len(e) for e in extra]}")
        need = [-(-(p + window) // page_size) for p in prefix_lens]
        for b, (p, k) in enumerate(zip(prefix_lens, need)):
            if p < 0 or len(pages[b]) < k:
                raise ValueError(f"sequence {b}: {len(pages[b])} pages cannot hold {p + window} slots")
        width = max(need)
        # layout: prefix lens | extra rows | table
        buf = array("q", prefix_lens)
        for e in extra:
            buf.extend(e)
        host = torch.frombuffer(_append_page_rows(buf, pages, need, width), dtype=torch.int64)
        dev = torch.device(device)
        flat = to_device(host, dev)
        e = len(extra)
        prefix = flat[:n]
        page_table = flat[(1 + e) * n:].view(n, width)
        logical = prefix[:, None] + torch.arange(window, device=dev)  # [B, window]
        slots = page_table.gather(1, logical // page_size) * page_size + logical % page_size
        return cls(prefix=prefix, prefix32=prefix.to(torch.int32), page_table=page_table.to(torch.int32),
                   window_slots=slots, extra=flat[n:(1 + e) * n].view(e, n),
                   prefix_lens_host=tuple(int(p) for p in prefix_lens), window=window, page_size=page_size)
