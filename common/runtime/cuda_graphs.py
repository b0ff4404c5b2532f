"""GraphRunner: CUDA graphs of fixed-shape forwards, one per batch-size bucket.

The only module that captures CUDA graphs. It graphs the forwards named by `Forward`, each from the eager
function the caller passes in (common/runtime/runner.py passes its own; this module never imports it), and
keeps each forward's runners in a `GraphSet`, which finds the runner that replays a batch. Two shapes are
graphed:
- the plain decode step (one causal query per sequence);
- masked EAGLE forwards of q queries per sequence over a window of w slots (`ForwardBatch.tree`):
  the verify forward (q = w = N), each draft step (q = k, w = (level+1)k, with a hidden input) and the
  fixed-shape draft extend (q = w = S+1, causal mask, hidden input, outputs at one row per sequence
  picked by batch.logit_rows).
A batch of B sequences replays the graph of the smallest captured bucket >= B: the real rows are
copied into the bucket's static ForwardBatch (mask [bucket*q*w], positions, slots, page table,
lengths, hidden input, the logit rows of a per-sequence runner), and padded rows become dummy
requests that read and write only the dummy page 0 (prefix 0, seq_len w (1 for decode), mask all
visible, slots 0, token 0, logit row = its last query). The kernels the
step runs must not read per-step host values (the Triton attention plans from batch shape only; see
common/attention/triton_paged.py); the torch reference ops are not graph safe.

Each GraphRunner captures largest bucket first into its own memory pool (the smaller graphs reuse
its blocks), so outputs of one runner survive replays of another. Outputs of `run` are views into
static buffers, valid until the same runner's next `run`.
Destroy the runners (or drop them) before tearing down NCCL communicators.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from common.forward.batch import ForwardBatch
from common.kvcache.pool import KVPool
from common.model.config import ModelConfig, eagle_step_slots

Outputs = torch.Tensor | tuple[torch.Tensor, ...]
# static batch (and static hidden input [T,H] when the runner has one) -> output(s) [T, ...] (row = token)
StepFn = Callable[..., Outputs]


class Forward(Enum):
    """The forwards that may replay from CUDA graphs. Each has one eager function (the step its graphs
    capture, and what runs when no graph fits a batch). For B sequences:
    - DECODE: one causal query each -> logits [B, V];
    - VERIFY: the EAGLE tree, N queries over N slots -> (logits [B*N, V], hidden [B*N, H]);
    - DRAFT_STEP: draft level l, k queries over (l+1)k slots, hidden input -> (logits, hidden) [B*k, ...];
    - DRAFT_EXTEND: S+1 causal queries, hidden input, one logit row each -> (topk_p [B, k], topk_idx [B, k],
      hidden [B, H])."""

    DECODE = "decode"
    VERIFY = "verify"
    DRAFT_STEP = "draft step"
    DRAFT_EXTEND = "draft extend"


SPEC_FORWARDS = (Forward.VERIFY, Forward.DRAFT_STEP, Forward.DRAFT_EXTEND)  # the forwards of an EAGLE step


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    batch: ForwardBatch  # static inputs
    hidden: torch.Tensor | None  # static hidden input [bucket*q, H] (draft steps, draft extend)
    out: Outputs  # static output(s) [bucket*q, ...] ([bucket, ...] with outputs_per_seq)


class GraphRunner:
    def __init__(self, step: StepFn, batch_sizes: Sequence[int], max_pages_per_seq: int, page_size: int,
                 device: torch.device | str, *, queries: int = 1, window: int = 0, hidden_size: int = 0,
                 hidden_dtype: torch.dtype = torch.bfloat16, outputs_per_seq: bool = False) -> None:
        """window 0: plain decode (one causal query per sequence). window w > 0: `queries` masked queries
        per sequence over w window slots (ForwardBatch.tree). hidden_size > 0: the step also takes a
        static hidden input [T, hidden_size] (called as step(batch, hidden)). outputs_per_seq (window > 0):
        batch.logit_rows holds one row per sequence, loaded at every replay (a padded sequence selects
        its own last query), and the step's outputs have one row per sequence."""
        if not batch_sizes:
            raise ValueError("GraphRunner needs at least one batch size")
        if (window == 0 and queries != 1) or (window > 0 and not 1 <= queries <= window):
            raise ValueError(f"GraphRunner: {queries} queries per sequence over a window of {window}")
        if outputs_per_seq and window == 0:
            raise ValueError("GraphRunner: outputs_per_seq needs a masked (window > 0) batch")
        self.step = step
        self.batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
        self.max_pages = max_pages_per_seq
        self.page_size = page_size
        self.device = torch.device(device)
        self.q, self.w = queries, window
        self.hidden_size, self.hidden_dtype = hidden_size, hidden_dtype
        self.per_seq = outputs_per_seq
        # a padded sequence's logit row: its own last query
        self._pad_rows = torch.arange(self.batch_sizes[-1], device=self.device) * queries + (queries - 1)
        self.graphs: dict[int, _Graph] = {}
        self.pool = None

    # ------------------------------------------------------------------ capture
    def _static_batch(self, bs: int) -> ForwardBatch:
        """A bucket's static batch, every row a dummy request on page 0."""
        dev = self.device
        i32, i64 = torch.int32, torch.int64
        q, w = self.q, self.w
        seq_len = max(w, 1)
        return ForwardBatch(
            input_ids=torch.zeros(bs * q, dtype=i64, device=dev),
            positions=torch.zeros(bs * q, dtype=i64, device=dev),
            query_start=torch.arange(0, (bs + 1) * q, q, dtype=i32, device=dev),
            prefix_lens=torch.zeros(bs, dtype=i32, device=dev),
            seq_lens=torch.full((bs,), seq_len, dtype=i32, device=dev),
            page_table=torch.zeros((bs, self.max_pages), dtype=i32, device=dev),
            out_slots=torch.zeros(bs * q, dtype=i64, device=dev),
            logit_rows=(self._pad_rows[:bs].clone() if self.per_seq
                        else torch.arange(bs * q, dtype=i64, device=dev)),
            page_size=self.page_size,
            mask=torch.ones(bs * q * w, dtype=torch.bool, device=dev) if w else None,
            mask_start=torch.arange(0, (bs + 1) * q * w, q * w, dtype=i64, device=dev) if w else None,
            # host lengths are placeholders: graph-safe kernels read only the shape
            query_lens_host=(q,) * bs, prefix_lens_host=(0,) * bs, seq_lens_host=(seq_len,) * bs,
        )

    def _static_hidden(self, bs: int) -> torch.Tensor | None:
        if not self.hidden_size:
            return None
        return torch.zeros((bs * self.q, self.hidden_size), dtype=self.hidden_dtype, device=self.device)

    def _call(self, batch: ForwardBatch, hidden: torch.Tensor | None) -> Outputs:
        return self.step(batch) if hidden is None else self.step(batch, hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (compiles kernels, fills caches) and capture every bucket, largest first."""
        self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for bs in sorted(self.batch_sizes, reverse=True):
            batch, hidden = self._static_batch(bs), self._static_hidden(bs)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._call(batch, hidden)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self._call(batch, hidden)
            self.graphs[bs] = _Graph(graph, batch, hidden, out)
        torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ replay
    def bucket(self, num_seqs: int) -> int | None:
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    def fits(self, batch: ForwardBatch) -> bool:
        """The batch has this runner's shape (bookkeeping only: says nothing about captured buckets)."""
        if batch.page_size != self.page_size or batch.page_table.shape[1] > self.max_pages:
            return False
        if self.w == 0:
            return batch.is_decode and batch.logit_rows.shape[0] == batch.num_seqs
        q, w = self.q, self.w
        rows = batch.num_seqs if self.per_seq else batch.num_tokens
        return (batch.mask is not None and batch.logit_rows.shape[0] == rows
                and all(n == q for n in batch.query_lens_host)
                and all(s - p == w for s, p in zip(batch.seq_lens_host, batch.prefix_lens_host)))

    def can_run(self, batch: ForwardBatch) -> bool:
        return self.bucket(batch.num_seqs) in self.graphs and self.fits(batch)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch, hidden: torch.Tensor | None = None) -> Outputs:
        """Replay for a batch of this runner's shape (check can_run first); returns the first B*q rows
        (B with outputs_per_seq) of each output. `hidden` [B*q, H]: the hidden input of a runner built
        with hidden_size."""
        n = batch.num_seqs
        bs = self.bucket(n)
        if bs is None or bs not in self.graphs or not self.fits(batch):
            raise ValueError(f"no captured graph fits this batch ({n} sequences)")
        if (hidden is None) != (self.hidden_size == 0):
            raise ValueError("a hidden input goes with (and only with) a runner built with hidden_size")
        g = self.graphs[bs]
        self.load(g.batch, g.hidden, batch, hidden)
        g.graph.replay()
        rows = n if self.per_seq else n * self.q
        return tuple(o[:rows] for o in g.out) if isinstance(g.out, tuple) else g.out[:rows]

    def load(self, static: ForwardBatch, static_hidden: torch.Tensor | None, batch: ForwardBatch,
             hidden: torch.Tensor | None) -> None:
        """Copy a batch of this runner's shape (and its hidden input) into a bucket's static inputs: what
        `run` replays (exposed so that CPU tests can run the padded static batch eagerly)."""
        load_batch(static, batch, self._pad_rows if self.per_seq else None)
        if static_hidden is not None:
            load_rows(static_hidden, hidden)

    def close(self) -> None:
        """Release the graphs and their pool (call before NCCL teardown)."""
        self.graphs.clear()
        self.pool = None


def decode_buckets(max_bs: int) -> tuple[int, ...]:
    """Captured batch sizes up to max_bs: 1, 2, 4, 8, then every 8 (SGLang's spacing), and max_bs."""
    if max_bs < 1:
        raise ValueError(f"max batch size for CUDA graphs must be >= 1, got {max_bs}")
    sizes = {b for b in (1, 2, 4, 8) if b <= max_bs} | set(range(16, max_bs + 1, 8)) | {max_bs}
    return tuple(sorted(sizes))


def _check_decode(static: ForwardBatch, batch: ForwardBatch) -> None:
    n, bs = batch.num_seqs, static.num_seqs
    width = batch.page_table.shape[1]
    if n > bs or width > static.page_table.shape[1]:
        raise ValueError(f"decode batch ({n} x {width} pages) does not fit the static batch "
                         f"({bs} x {static.page_table.shape[1]})")


def load_decode_batch(static: ForwardBatch, batch: ForwardBatch) -> None:
    """Copy a decode batch's B rows into a bucket's static batch; rows past B become dummy requests
    on the dummy page 0 (token 0, position 0, seq_len 1, slot 0): they never touch a real page.
    (The torch twin of common/ops/triton_batch.load_batch, which does it in one launch on CUDA.)"""
    _check_decode(static, batch)
    n, bs = batch.num_seqs, static.num_seqs
    width = batch.page_table.shape[1]
    static.input_ids[:n].copy_(batch.input_ids)
    static.positions[:n].copy_(batch.positions)
    static.prefix_lens[:n].copy_(batch.prefix_lens)
    static.seq_lens[:n].copy_(batch.seq_lens)
    static.out_slots[:n].copy_(batch.out_slots)
    static.page_table[:n, :width].copy_(batch.page_table)
    static.page_table[:n, width:].zero_()
    if n < bs:
        static.input_ids[n:].zero_()
        static.positions[n:].zero_()
        static.prefix_lens[n:].zero_()
        static.seq_lens[n:].fill_(1)
        static.out_slots[n:].zero_()
        static.page_table[n:].zero_()


def load_batch(static: ForwardBatch, batch: ForwardBatch, pad_rows: torch.Tensor | None = None) -> None:
    """Copy a batch into a bucket's static batch of the same shape (decode or masked tree); pad_rows:
    the logit rows of padded sequences when the bucket loads one logit row per sequence. On CUDA one
    Triton launch (common/ops/triton_batch.py) instead of the twins' 7-15 copies and fills, which
    the GPU would wait for before every replay."""
    tree = static.mask is not None
    if static.input_ids.is_cuda and all(t.is_contiguous() for t in _fields(batch)):
        from common.ops import triton_batch

        if tree:
            _check_tree(static, batch)
            q, w = _tree_shape(static)
            triton_batch.load_batch(static, batch, q, w, w, pad_rows)
        else:
            _check_decode(static, batch)
            triton_batch.load_batch(static, batch, 1, 0, 1, pad_rows)
        return
    if tree:  # the twins check the shapes themselves
        load_tree_batch(static, batch)
    else:
        load_decode_batch(static, batch)
    if pad_rows is not None:
        n, bs = batch.num_seqs, static.num_seqs
        static.logit_rows[:n].copy_(batch.logit_rows)
        static.logit_rows[n:].copy_(pad_rows[n:bs])


def _fields(batch: ForwardBatch) -> tuple[torch.Tensor, ...]:
    f = (batch.input_ids, batch.positions, batch.out_slots, batch.prefix_lens, batch.seq_lens, batch.page_table,
         batch.logit_rows)
    return f if batch.mask is None else (*f, batch.mask)


def _tree_shape(static: ForwardBatch) -> tuple[int, int]:
    """(q queries per sequence, w window slots) of a tree bucket's static batch."""
    return static.query_lens_host[0], static.seq_lens_host[0] - static.prefix_lens_host[0]


def _check_tree(static: ForwardBatch, batch: ForwardBatch) -> None:
    n, bs = batch.num_seqs, static.num_seqs
    q, w = _tree_shape(static)
    width = batch.page_table.shape[1]
    if n > bs or width > static.page_table.shape[1] or batch.mask is None:
        raise ValueError(f"tree batch ({n} x {width} pages) does not fit the static batch "
                         f"({bs} x {static.page_table.shape[1]})")
    if batch.num_tokens != n * q or batch.mask.shape[0] != n * q * w:
        raise ValueError(f"tree batch of {batch.num_tokens} tokens / {batch.mask.shape[0]} mask bits is not "
                         f"{n} x {q} queries over {w} slots")


def load_tree_batch(static: ForwardBatch, batch: ForwardBatch) -> None:
    """Copy a masked batch of B sequences x q queries over w window slots (ForwardBatch.tree layout)
    into a bucket's static batch of the same q and w. Padded rows become dummy requests on page 0:
    token 0, position 0, prefix 0, seq_len w, slots 0, every window slot visible, page table zeros.
    (The torch twin of common/ops/triton_batch.load_batch.)"""
    _check_tree(static, batch)
    n, bs = batch.num_seqs, static.num_seqs
    q, w = _tree_shape(static)
    width = batch.page_table.shape[1]
    t = n * q
    static.input_ids[:t].copy_(batch.input_ids)
    static.positions[:t].copy_(batch.positions)
    static.out_slots[:t].copy_(batch.out_slots)
    static.prefix_lens[:n].copy_(batch.prefix_lens)
    static.seq_lens[:n].copy_(batch.seq_lens)
    static.page_table[:n, :width].copy_(batch.page_table)
    static.page_table[:n, width:].zero_()
    static.mask[:t * w].copy_(batch.mask)
    if n < bs:
        static.input_ids[t:].zero_()
        static.positions[t:].zero_()
        static.out_slots[t:].zero_()
        static.prefix_lens[n:].zero_()
        static.seq_lens[n:].fill_(w)
        static.page_table[n:].zero_()
        static.mask[t * w:].fill_(True)


def load_rows(static: torch.Tensor, rows: torch.Tensor) -> None:
    """static[:R] = rows; the padded rows past R are zeroed."""
    r = rows.shape[0]
    if r > static.shape[0] or rows.shape[1:] != static.shape[1:]:
        raise ValueError(f"rows {tuple(rows.shape)} do not fit the static buffer {tuple(static.shape)}")
    static[:r].copy_(rows)
    static[r:].zero_()


def graphs_supported(device: torch.device) -> bool:
    """CUDA with the graph-safe Triton attention (the torch reference attention is not graph safe)."""
    if device.type != "cuda":
        return False
    from common.attention import resolve, torch_ref

    return resolve(device) is not torch_ref.paged_attention


class GraphSet:
    """The graphs of one forward: a GraphRunner per window (a draft step has one per level, window
    (level+1)k; the other forwards one). Each runner has its own pool, so the verify outputs survive the
    draft and extend replays of the same step."""

    def __init__(self, runners: Sequence[GraphRunner]) -> None:
        if not runners:
            raise ValueError("GraphSet needs at least one runner")
        self.by_window = {g.w: g for g in runners}

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return next(iter(self.by_window.values())).batch_sizes

    def find(self, batch: ForwardBatch) -> GraphRunner | None:
        """The runner that replays this batch: the one of its window, if that has a captured bucket for the
        batch's size and fits its shape; None sends the batch to the eager forward."""
        g = self.by_window.get(_window(batch))
        return g if g is not None and g.can_run(batch) else None

    def close(self) -> None:
        """Release every runner's graphs and pool (call before NCCL teardown)."""
        for g in self.by_window.values():
            g.close()
        self.by_window.clear()


def _window(batch: ForwardBatch) -> int | None:
    """The window slots per sequence of a masked batch (0 for a batch without a mask, None for a masked
    batch of no sequences)."""
    if batch.mask is None:
        return 0
    if not batch.num_seqs:
        return None
    return batch.seq_lens_host[0] - batch.prefix_lens_host[0]


def _require_graphs(device: torch.device) -> None:
    if not graphs_supported(device):
        raise RuntimeError(f"CUDA graphs need a CUDA device with the Triton attention (device {device})")


def _page_width(kv_pool: KVPool, slots: int) -> int:
    """Page-table width of the captured batches: the pages of `slots` slots plus one, at most the whole pool
    (a batch with a wider page table runs eagerly)."""
    return min(kv_pool.num_pages, -(-slots // kv_pool.page_size) + 1)


def capture_decode_graphs(decode: StepFn, config: ModelConfig, kv_pool: KVPool,
                          max_bs: int) -> dict[Forward, GraphSet]:
    """Graphs of the plain decode forward `decode` (batch -> logits [B, V]) over `kv_pool` for every bucket
    up to max_bs. The page table is as wide as the longest context the model allows (or the whole pool): a
    longer request falls back to the eager forward."""
    _require_graphs(kv_pool.device)
    max_pages = _page_width(kv_pool, config.max_position_embeddings)
    graphs = GraphRunner(decode, decode_buckets(max_bs), max_pages, kv_pool.page_size, kv_pool.device)
    graphs.capture()
    return {Forward.DECODE: GraphSet([graphs])}


def capture_spec_graphs(steps: Mapping[Forward, StepFn], config: ModelConfig, kv_pool: KVPool,
                        hidden_dtype: torch.dtype, max_bs: int, num_steps: int, topk: int,
                        num_draft_tokens: int) -> dict[Forward, GraphSet]:
    """Graphs of the EAGLE forwards `steps` (one eager function per SPEC_FORWARDS member) over `kv_pool` for
    every bucket up to max_bs: the verify (logits and hidden of all N rows), the S-1 draft steps (logits
    and hidden of all k rows; hidden input of `hidden_dtype`) and the fixed-shape draft extend (top-k and
    hidden of each sequence's last real row, see decode_worker.spec.eagle)."""
    _require_graphs(kv_pool.device)
    page, device, sizes = kv_pool.page_size, kv_pool.device, decode_buckets(max_bs)
    # the page table of an EAGLE step covers the slots it may write past L (the scheduler's step_slots)
    max_pages = _page_width(kv_pool, config.max_position_embeddings
                            + eagle_step_slots(num_steps, topk, num_draft_tokens))
    hidden = config.hidden_size
    verify = GraphRunner(steps[Forward.VERIFY], sizes, max_pages, page, device, queries=num_draft_tokens,
                         window=num_draft_tokens)
    draft = [GraphRunner(steps[Forward.DRAFT_STEP], sizes, max_pages, page, device, queries=topk,
                         window=(level + 1) * topk, hidden_size=hidden, hidden_dtype=hidden_dtype)
             for level in range(num_steps - 1)]
    width = num_steps + 1
    extend = GraphRunner(steps[Forward.DRAFT_EXTEND], sizes, max_pages, page, device, queries=width,
                         window=width, hidden_size=hidden, hidden_dtype=hidden_dtype, outputs_per_seq=True)
    for g in (verify, *draft, extend):
        g.capture()
    sets = {Forward.VERIFY: GraphSet([verify]), Forward.DRAFT_EXTEND: GraphSet([extend])}
    if draft:  # S = 1 has no draft step
        sets[Forward.DRAFT_STEP] = GraphSet(draft)
    return sets


__all__ = ["SPEC_FORWARDS", "Forward", "GraphRunner", "GraphSet", "capture_decode_graphs",
           "capture_spec_graphs", "decode_buckets", "graphs_supported", "load_batch", "load_decode_batch",
           "load_rows", "load_tree_batch"]
