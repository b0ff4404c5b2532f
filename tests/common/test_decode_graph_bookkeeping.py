"""CPU checks of the decode CUDA-graph bookkeeping: the vectorised decode batch, bucket choice and
padding to the dummy page 0. The padded static batch is run eagerly on CPU, which is exactly what a
captured graph replays on CUDA."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from common.forward.batch import ForwardBatch, SeqSpec
from common.runtime.cuda_graphs import GraphRunner, decode_buckets, graphs_supported, load_decode_batch
from common.runtime.runner import ModelRunner

PAGE = 4


def test_decode_batch_matches_build() -> None:
    tokens, kv_lens = [5, 9, 2], [0, 7, 12]
    pages = [[3, 8], [4, 6, 11], [1, 2, 5, 7]]  # more pages than the step reads
    got = ForwardBatch.decode(tokens, kv_lens, pages, PAGE)
    want = ForwardBatch.build([SeqSpec([t], [kv], kv + 1, p[: kv // PAGE + 1])
                               for t, kv, p in zip(tokens, kv_lens, pages)], PAGE)
    for field in ("input_ids", "positions", "query_start", "prefix_lens", "seq_lens", "page_table", "out_slots",
                  "logit_rows"):
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert got.mask is None and got.is_decode
    assert (got.query_lens_host, got.prefix_lens_host, got.seq_lens_host) == (
        want.query_lens_host, want.prefix_lens_host, want.seq_lens_host)


def test_decode_batch_rejects_short_page_lists() -> None:
    with pytest.raises(ValueError):
        ForwardBatch.decode([1], [PAGE], [[3]], PAGE)  # slot PAGE needs a second page
    with pytest.raises(ValueError):
        ForwardBatch.decode([], [], [], PAGE)


def test_decode_buckets() -> None:
    assert decode_buckets(1) == (1,)
    assert decode_buckets(6) == (1, 2, 4, 6)
    assert decode_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    assert decode_buckets(20) == (1, 2, 4, 8, 16, 20)
    with pytest.raises(ValueError):
        decode_buckets(0)
    g = GraphRunner(lambda b: b.input_ids, decode_buckets(20), 8, PAGE, "cpu")
    assert [g.bucket(n) for n in (1, 3, 5, 16, 17, 20, 21)] == [1, 4, 8, 16, 20, 20, None]


def test_padding_goes_to_dummy_page() -> None:
    g = GraphRunner(lambda b: b.input_ids, [4], 6, PAGE, "cpu")
    static = g._static_batch(4)
    static.page_table.fill_(99)  # leftovers of an earlier, larger step
    static.input_ids.fill_(99)
    batch = ForwardBatch.decode([5, 9], [3, 9], [[7], [4, 6, 11]], PAGE)
    load_decode_batch(static, batch)
    assert static.input_ids.tolist() == [5, 9, 0, 0]
    assert static.positions.tolist() == [3, 9, 0, 0]
    assert static.prefix_lens.tolist() == [3, 9, 0, 0]
    assert static.seq_lens.tolist() == [4, 10, 1, 1]
    assert static.out_slots.tolist() == [7 * PAGE + 3, 11 * PAGE + 1, 0, 0]  # padded rows: slot 0 of page 0
    assert static.page_table.tolist() == [[7, 0, 0, 0, 0, 0], [4, 6, 11, 0, 0, 0], [0] * 6, [0] * 6]
    with pytest.raises(ValueError):
        load_decode_batch(g._static_batch(1), batch)


def test_graphs_not_supported_on_cpu() -> None:
    assert not graphs_supported(torch.device("cpu"))


@torch.inference_mode()
def test_padded_static_batch_gives_real_rows_and_spares_real_pages(tiny_model_dir: Path) -> None:
    """What a replay computes (the bucket's padded batch), run eagerly: real rows equal the unpadded
    forward, and the dummy rows write nothing but page 0."""
    runner = ModelRunner(tiny_model_dir, "cpu", torch.float32, PAGE, 64)
    torch.manual_seed(0)
    lens, pages = [5, 11, 2], [[1, 2], [3, 4, 5], [6]]
    for n, p in zip(lens, pages):  # some KV context per request
        runner.forward(ForwardBatch.build([SeqSpec(list(range(3, 3 + n)), range(n), n, p)], PAGE))
    batch = ForwardBatch.decode([7, 8, 9], lens, pages, PAGE)
    eager = runner.decode_logits(batch).clone()  # no graphs on CPU: the eager forward
    g = GraphRunner(lambda b: runner.forward(b)[0], [8], 4, PAGE, "cpu")
    static = g._static_batch(8)
    load_decode_batch(static, batch)
    after_eager = runner.kv_pool.kv.clone()
    # the graph-safe kernels read lengths from the tensors; the CPU reference reads the host copies
    static = dataclasses.replace(static, prefix_lens_host=tuple(static.prefix_lens.tolist()),
                                 seq_lens_host=tuple(static.seq_lens.tolist()))
    padded = runner.forward(static)[0]
    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)
    # the padded run rewrites the real slots with the same K/V (to rounding); its dummy rows write page 0
    kv = runner.kv_pool.kv
    torch.testing.assert_close(kv[:, :, 1:], after_eager[:, :, 1:], rtol=1e-5, atol=1e-5)
    assert (kv[:, :, 0] != after_eager[:, :, 0]).any()
