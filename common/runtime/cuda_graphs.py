"""GraphRunner: CUDA graphs of the decode step, one per batch-size bucket.

The only module that captures CUDA graphs. A plain decode step (one causal query per sequence)
of B sequences replays the graph of the smallest captured bucket >= B: the real rows are copied
into the bucket's static ForwardBatch, and padded rows become dummy requests that read and write
only the dummy page 0 (seq_len 1, slot 0 of page 0, token 0). The kernels the step runs must not
read per-step host values (the Triton attention plans from batch shape only; see
common/attention/triton_paged.py); the torch reference ops are not graph safe.

Capture goes largest bucket first into one shared memory pool (the smaller graphs reuse its
blocks). Outputs of `run` are views into static buffers, valid until the next `run`.
Destroy the runner (or drop it) before tearing down NCCL communicators.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from common.batch import ForwardBatch

if TYPE_CHECKING:
    from common.runtime.runner import ModelRunner

Outputs = torch.Tensor | tuple[torch.Tensor, ...]
StepFn = Callable[[ForwardBatch], Outputs]  # static batch -> output(s) [B, ...] (row i = sequence i)


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    batch: ForwardBatch  # static inputs
    out: Outputs  # static output(s) [bucket, ...]


class GraphRunner:
    def __init__(self, step: StepFn, batch_sizes: Sequence[int], max_pages_per_seq: int, page_size: int,
                 device: torch.device | str) -> None:
        if not batch_sizes:
            raise ValueError("GraphRunner needs at least one batch size")
        self.step = step
        self.batch_sizes = tuple(sorted({int(b) for b in batch_sizes}))
        self.max_pages = max_pages_per_seq
        self.page_size = page_size
        self.device = torch.device(device)
        self.graphs: dict[int, _Graph] = {}
        self.pool = None

    # ------------------------------------------------------------------ capture
    def _static_batch(self, bs: int) -> ForwardBatch:
        dev = self.device
        i32, i64 = torch.int32, torch.int64
        return ForwardBatch(
            input_ids=torch.zeros(bs, dtype=i64, device=dev),
            positions=torch.zeros(bs, dtype=i64, device=dev),
            query_start=torch.arange(bs + 1, dtype=i32, device=dev),
            prefix_lens=torch.zeros(bs, dtype=i32, device=dev),
            seq_lens=torch.ones(bs, dtype=i32, device=dev),
            page_table=torch.zeros((bs, self.max_pages), dtype=i32, device=dev),
            out_slots=torch.zeros(bs, dtype=i64, device=dev),
            logit_rows=torch.arange(bs, dtype=i64, device=dev),
            page_size=self.page_size,
            # host lengths are placeholders: graph-safe kernels read only the shape
            query_lens_host=(1,) * bs, prefix_lens_host=(0,) * bs, seq_lens_host=(1,) * bs,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up (compiles kernels, fills caches) and capture every bucket, largest first."""
        self.pool = torch.cuda.graph_pool_handle()
        side = torch.cuda.Stream(self.device)
        for bs in sorted(self.batch_sizes, reverse=True):
            batch = self._static_batch(bs)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self.step(batch)
            torch.cuda.current_stream(self.device).wait_stream(side)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = self.step(batch)
            self.graphs[bs] = _Graph(graph, batch, out)
        torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ replay
    def bucket(self, num_seqs: int) -> int | None:
        return next((b for b in self.batch_sizes if b >= num_seqs), None)

    def can_run(self, batch: ForwardBatch) -> bool:
        return (batch.is_decode and batch.page_size == self.page_size
                and batch.page_table.shape[1] <= self.max_pages
                and batch.logit_rows.shape[0] == batch.num_seqs
                and self.bucket(batch.num_seqs) in self.graphs)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> Outputs:
        """Replay for a decode batch (check can_run first); returns the first B rows of each output."""
        n = batch.num_seqs
        bs = self.bucket(n)
        if bs is None or bs not in self.graphs or not self.can_run(batch):
            raise ValueError(f"no captured graph fits this batch ({n} sequences)")
        g = self.graphs[bs]
        load_decode_batch(g.batch, batch)
        g.graph.replay()
        return tuple(o[:n] for o in g.out) if isinstance(g.out, tuple) else g.out[:n]

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


def load_decode_batch(static: ForwardBatch, batch: ForwardBatch) -> None:
    """Copy a decode batch's B rows into a bucket's static batch; rows past B become dummy requests
    on the dummy page 0 (token 0, position 0, seq_len 1, slot 0): they never touch a real page."""
    n, bs = batch.num_seqs, static.num_seqs
    width = batch.page_table.shape[1]
    if n > bs or width > static.page_table.shape[1]:
        raise ValueError(f"decode batch ({n} x {width} pages) does not fit the static batch "
                         f"({bs} x {static.page_table.shape[1]})")
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


def graphs_supported(device: torch.device) -> bool:
    """CUDA with the graph-safe Triton attention (the torch reference attention is not graph safe)."""
    if device.type != "cuda":
        return False
    from common.attention import resolve, torch_ref

    return resolve(device) is not torch_ref.paged_attention


def capture_decode_graphs(runner: ModelRunner, max_bs: int) -> GraphRunner:
    """Graphs of the runner's plain decode forward (logits only) for every bucket up to max_bs.

    The page table is as wide as the longest context the model allows (or the whole pool): a
    longer request falls back to the eager forward."""
    if not graphs_supported(runner.device):
        raise RuntimeError(f"CUDA graphs need a CUDA device with the Triton attention (device {runner.device})")
    page = runner.page_size
    max_pages = min(runner.kv_pool.num_pages, -(-runner.config.max_position_embeddings // page) + 1)
    graphs = GraphRunner(lambda b: runner.forward(b)[0], decode_buckets(max_bs), max_pages, page, runner.device)
    graphs.capture()
    return graphs


__all__ = ["GraphRunner", "capture_decode_graphs", "decode_buckets", "graphs_supported", "load_decode_batch"]
