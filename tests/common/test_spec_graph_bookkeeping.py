"""CPU checks of the EAGLE CUDA-graph bookkeeping: the vectorised tree batch (verify and draft steps),
the static mask layout [bucket*q*w], loading into a bucket's static batch with padding on the dummy
page 0, and the shape checks that send a batch to a graph or to the eager forward. The padded static
batch is run eagerly on CPU, which is exactly what a captured graph replays on CUDA."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from common.forward.batch import ForwardBatch, SeqSpec, TreeLayout
from common.runtime.cuda_graphs import Forward, GraphRunner, GraphSet, load_batch, load_rows, load_tree_batch
from common.runtime.runner import ModelRunner
from decode_worker.spec.tree import ancestor_mask

PAGE = 4
FIELDS = ("input_ids", "positions", "query_start", "prefix_lens", "seq_lens", "page_table", "out_slots",
          "logit_rows", "mask", "mask_start")


def _tree(n_seqs: int, q: int, w: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 500, (n_seqs, q), generator=gen)
    depth = torch.randint(0, 4, (n_seqs, q), generator=gen)
    mask = torch.rand((n_seqs, q, w), generator=gen) < 0.5
    return tokens, depth, mask


def _assert_same_batch(got: ForwardBatch, want: ForwardBatch) -> None:
    for field in FIELDS:
        a, b = getattr(got, field), getattr(want, field)
        assert a.dtype == b.dtype and torch.equal(a, b), field
    assert (got.query_lens_host, got.prefix_lens_host, got.seq_lens_host) == (
        want.query_lens_host, want.prefix_lens_host, want.seq_lens_host)


@pytest.mark.parametrize("q,w", [(4, 4), (2, 2), (2, 6), (1, 3)])  # verify N=4; draft levels of k=2; a chain
def test_tree_batch_matches_build(q: int, w: int) -> None:
    prefix = [0, 3, 9]
    pages = [[5, 2, 9], [4, 6, 11, 3], [1, 7, 8, 10, 12]]  # more pages than the forward reads
    tokens, depth, mask = _tree(3, q, w, seed=q * 10 + w)
    got = ForwardBatch.tree(tokens, depth, mask, prefix, pages, PAGE)
    want = ForwardBatch.build([SeqSpec(tokens[b].tolist(), (prefix[b] + depth[b]).tolist(), prefix[b] + w,
                                       pages[b][: -(-(prefix[b] + w) // PAGE)], prefix_len=prefix[b],
                                       mask=mask[b], logit_rows=range(q)) for b in range(3)], PAGE)
    _assert_same_batch(got, want)
    # query i of sequence b writes logical slot L + w - q + i
    for b in range(3):
        for i in range(q):
            logical = prefix[b] + w - q + i
            assert int(got.out_slots[b * q + i]) == pages[b][logical // PAGE] * PAGE + logical % PAGE


@pytest.mark.parametrize("q,w", [(4, 4), (2, 2), (2, 6), (1, 3)])
def test_tree_in_one_layout_for_every_forward_of_a_step(q: int, w: int) -> None:
    """tree_in over a layout of a wider window (built once per EAGLE step) gives tree()'s batch, but for a
    page table that may also list the pages of the slots up to L + window."""
    prefix, window = [0, 3, 9], 6
    pages = [[5, 2, 9], [4, 6, 11, 3], [1, 7, 8, 10, 12]]
    tokens, depth, mask = _tree(3, q, w, seed=q * 10 + w)
    layout = TreeLayout.build(prefix, pages, window, PAGE, extra=[[7, 8, 9], [1, 0, 2]])
    assert layout.extra.tolist() == [[7, 8, 9], [1, 0, 2]]
    got = ForwardBatch.tree_in(layout, tokens, depth, mask)
    want = ForwardBatch.tree(tokens, depth, mask, prefix, pages, PAGE)
    for field in FIELDS:
        a, b = getattr(got, field), getattr(want, field)
        if field == "page_table":
            assert a.dtype == b.dtype and torch.equal(a[:, :b.shape[1]] * (b > 0), b), field
        else:
            assert a.dtype == b.dtype and torch.equal(a, b), field
    assert (got.query_lens_host, got.prefix_lens_host, got.seq_lens_host) == (
        want.query_lens_host, want.prefix_lens_host, want.seq_lens_host)
    rows = torch.tensor([1, 5])
    assert ForwardBatch.tree_in(layout, tokens, depth, mask, logit_rows=rows).logit_rows is rows
    with pytest.raises(ValueError):
        ForwardBatch.tree_in(layout, *_tree(3, 2, 7, seed=0))  # window 7 > the layout's 6
    with pytest.raises(ValueError):
        TreeLayout.build(prefix, pages, 12, PAGE)  # sequence 2: 9 + 12 slots need 6 pages, it has 5


def test_tree_batch_rejects_bad_shapes() -> None:
    tokens, depth, mask = _tree(2, 4, 4, seed=0)
    with pytest.raises(ValueError):
        ForwardBatch.tree(tokens, depth, mask, [3, 4], [[1, 2], [3]], PAGE)  # 8 slots need 2 pages
    with pytest.raises(ValueError):
        ForwardBatch.tree(tokens, depth[:, :3], mask, [0, 0], [[1], [2]], PAGE)
    with pytest.raises(ValueError):
        ForwardBatch.tree(tokens, depth, mask[:, :, :3], [0, 0], [[1], [2]], PAGE)  # q > w


def _verify_runner(buckets: list[int], n: int = 4, max_pages: int = 6) -> GraphRunner:
    return GraphRunner(lambda b: b.input_ids, buckets, max_pages, PAGE, "cpu", queries=n, window=n)


def test_static_tree_batch_layout() -> None:
    """Every row of a fresh static batch is a dummy request on page 0 with an all-visible N x N block."""
    g = _verify_runner([3])
    s = g._static_batch(3)
    assert s.num_tokens == 12 and s.mask.shape == (3 * 4 * 4,) and s.mask.all()
    assert s.mask_start.tolist() == [0, 16, 32, 48]
    assert s.query_start.tolist() == [0, 4, 8, 12]
    assert s.logit_rows.tolist() == list(range(12))
    assert s.seq_lens.tolist() == [4] * 3 and s.prefix_lens.tolist() == [0] * 3
    assert not s.page_table.any() and not s.out_slots.any()
    assert (s.query_lens_host, s.max_query_len) == ((4,) * 3, 4)


def test_tree_padding_goes_to_dummy_page() -> None:
    g = _verify_runner([4])
    static = g._static_batch(4)
    for t in (static.input_ids, static.positions, static.out_slots, static.page_table, static.seq_lens):
        t.fill_(99)  # leftovers of an earlier, larger step
    static.mask.fill_(False)
    tokens, depth, mask = _tree(2, 4, 4, seed=1)
    mask = ancestor_mask(torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2]]))  # a tree and a chain
    batch = ForwardBatch.tree(tokens, depth, mask, [3, 9], [[7, 2], [4, 6, 11, 5]], PAGE)
    load_batch(static, batch)
    assert static.input_ids.tolist() == tokens.reshape(-1).tolist() + [0] * 8
    assert static.positions.tolist() == (torch.tensor([[3], [9]]) + depth).reshape(-1).tolist() + [0] * 8
    assert static.prefix_lens.tolist() == [3, 9, 0, 0]
    assert static.seq_lens.tolist() == [7, 13, 4, 4]
    # sequence 0: slots 3..6 over pages 7, 2; sequence 1: slots 9..12 over pages 11, 5; padding: slot 0
    assert static.out_slots.tolist() == [7 * PAGE + 3, 2 * PAGE, 2 * PAGE + 1, 2 * PAGE + 2,
                                         11 * PAGE + 1, 11 * PAGE + 2, 11 * PAGE + 3, 5 * PAGE] + [0] * 8
    assert static.page_table.tolist() == [[7, 2, 0, 0, 0, 0], [4, 6, 11, 5, 0, 0]] + [[0] * 6] * 2
    # mask block of request b = its N x N ancestor mask, row-major at b*N*N; padded blocks all visible
    blocks = static.mask.view(4, 4, 4)
    assert torch.equal(blocks[:2], mask) and blocks[2:].all()
    assert static.mask_start.tolist() == [0, 16, 32, 48, 64]
    with pytest.raises(ValueError):
        load_tree_batch(g._static_batch(1), batch)


def test_graph_shape_checks() -> None:
    """A batch goes to a runner only with its q, window and page size; captured buckets aside."""
    g = _verify_runner([1, 2, 4], max_pages=3)
    tokens, depth, mask = _tree(2, 4, 4, seed=2)
    batch = ForwardBatch.tree(tokens, depth, mask, [3, 5], [[1, 2], [3, 4, 5]], PAGE)
    assert g.fits(batch) and not g.can_run(batch)  # nothing captured on CPU
    g.graphs[2] = None  # type: ignore[assignment]  # bookkeeping only: pretend bucket 2 exists
    assert g.can_run(batch)
    wide = ForwardBatch.tree(tokens, depth, mask, [3, 9], [[1, 2], [3, 4, 5, 6]], PAGE)
    assert not g.fits(wide)  # 4 pages > 3
    draft = ForwardBatch.tree(tokens[:, :2], depth[:, :2], mask[:, :2], [3, 5], [[1, 2], [3, 4, 5]], PAGE)
    assert not g.fits(draft)  # 2 queries over 4 slots is a draft step, not this verify
    plain = ForwardBatch.decode([1, 2], [3, 5], [[1], [3, 4]], PAGE)
    assert not g.fits(plain)
    decode = GraphRunner(lambda b: b.input_ids, [2], 3, PAGE, "cpu")
    assert decode.fits(plain) and not decode.fits(batch)
    with pytest.raises(ValueError):
        GraphRunner(lambda b: b.input_ids, [2], 3, PAGE, "cpu", queries=4, window=2)
    levels = [GraphRunner(lambda b, h: h, [2], 3, PAGE, "cpu", queries=2, window=2 * (lv + 1), hidden_size=8)
              for lv in range(2)]
    draft_steps, verify = GraphSet(levels), GraphSet([g])
    for lv in levels:
        lv.graphs[2] = None  # type: ignore[assignment]
    assert draft_steps.find(draft) is levels[1]  # window 4 = level 1 of k = 2
    assert draft_steps.find(batch) is None  # 4 queries: no draft level takes it
    assert draft_steps.find(plain) is None
    assert verify.find(batch) is g and verify.find(draft) is None and verify.find(plain) is None
    assert verify.find(wide) is None  # its window, but too many pages
    assert GraphSet([decode]).find(plain) is None  # the decode runner's bucket 2 was never captured
    extend = GraphRunner(lambda b, h: h, [2], 3, PAGE, "cpu", queries=4, window=4, hidden_size=8,
                         outputs_per_seq=True)
    extend.graphs[2] = None  # type: ignore[assignment]
    assert not extend.fits(batch)  # one logit row per query: a verify, not an extend
    per_seq = dataclasses.replace(batch, logit_rows=torch.tensor([3, 6]))
    assert extend.can_run(per_seq) and not g.fits(per_seq)
    with pytest.raises(ValueError):
        GraphRunner(lambda b: b.input_ids, [2], 3, PAGE, "cpu", outputs_per_seq=True)  # decode has no rows
    assert GraphSet([extend]).find(per_seq) is extend and GraphSet([extend]).find(batch) is None
    for graphs in (verify, draft_steps, GraphSet([extend])):
        graphs.close()
        assert not graphs.by_window
    assert not g.graphs and not extend.graphs and not any(lv.graphs for lv in levels)
    with pytest.raises(ValueError):
        GraphSet([])


def test_load_rows_zeroes_padding() -> None:
    static = torch.full((6, 3), 9.0)
    load_rows(static, torch.ones(2, 3))
    assert static[:2].eq(1).all() and static[2:].eq(0).all()
    with pytest.raises(ValueError):
        load_rows(static, torch.ones(7, 3))


def _prefilled_runner(tiny_model_dir: Path, lens: list[int], pages: list[list[int]]) -> ModelRunner:
    runner = ModelRunner(tiny_model_dir, "cpu", torch.float32, PAGE, 64, with_mtp=True)
    torch.manual_seed(0)
    for n, p in zip(lens, pages):
        batch = ForwardBatch.build([SeqSpec(list(range(3, 3 + n)), range(n), n, p)], PAGE)
        _, hidden = runner.forward(batch)
        runner.draft_forward(batch, hidden)
    return runner


def _with_static_host_lens(static: ForwardBatch) -> ForwardBatch:
    # the graph-safe kernels read lengths from the tensors; the CPU reference reads the host copies
    return dataclasses.replace(static, prefix_lens_host=tuple(static.prefix_lens.tolist()),
                               seq_lens_host=tuple(static.seq_lens.tolist()))


@torch.inference_mode()
def test_padded_verify_batch_gives_real_rows_and_spares_real_pages(tiny_model_dir: Path) -> None:
    """What a verify replay computes (the bucket's padded batch), run eagerly: real rows equal the
    unpadded forward, and the dummy rows write nothing but page 0."""
    lens, pages = [5, 11, 2], [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    runner = _prefilled_runner(tiny_model_dir, lens, pages)
    n = 4
    parents = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2], [-1, 0, 1, 1]])
    mask = ancestor_mask(parents)
    depth = mask.sum(-1) - 1
    tokens = torch.randint(0, 500, (3, n), generator=torch.Generator().manual_seed(3))
    batch = ForwardBatch.tree(tokens, depth, mask, lens, pages, PAGE)
    eager_logits, eager_hidden = (t.clone() for t in runner.verify_forward(batch))  # no graphs on CPU: eager
    after_eager = runner.kv_pool.kv.clone()
    g = GraphRunner(runner.forward, [8], 5, PAGE, "cpu", queries=n, window=n)
    static = g._static_batch(8)
    load_batch(static, batch)
    logits, hidden = runner.forward(_with_static_host_lens(static))
    torch.testing.assert_close(logits[: 3 * n], eager_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden[: 3 * n], eager_hidden, rtol=1e-5, atol=1e-5)
    kv = runner.kv_pool.kv
    torch.testing.assert_close(kv[:, :, 1:], after_eager[:, :, 1:], rtol=1e-5, atol=1e-5)
    assert (kv[:, :, 0] != after_eager[:, :, 0]).any()


@torch.inference_mode()
def test_padded_draft_step_batch_gives_real_rows(tiny_model_dir: Path) -> None:
    """A draft step (k = 2, level 1: 2 queries over 4 scratch slots) with its hidden input, padded to
    a bucket of 4: real rows equal the unpadded draft forward."""
    lens, pages = [5, 11], [[1, 2, 3], [4, 5, 6, 7]]
    runner = _prefilled_runner(tiny_model_dir, lens, pages)
    k, level = 2, 1
    w = (level + 1) * k
    mask = torch.tensor([[[True, False, True, False], [True, False, False, True]],
                         [[False, True, True, False], [False, True, False, True]]])
    tokens = torch.tensor([[17, 23], [5, 9]])
    depth = torch.full((2, k), level)
    hidden_in = torch.randn(2 * k, runner.config.hidden_size, generator=torch.Generator().manual_seed(4))
    batch = ForwardBatch.tree(tokens, depth, mask, lens, pages, PAGE)
    eager_logits, eager_hidden = (t.clone() for t in runner.draft_step_forward(batch, hidden_in))
    g = GraphRunner(runner.draft_forward, [4], 5, PAGE, "cpu", queries=k, window=w,
                    hidden_size=runner.config.hidden_size, hidden_dtype=torch.float32)
    static, static_hidden = g._static_batch(4), g._static_hidden(4)
    load_batch(static, batch)
    load_rows(static_hidden, hidden_in)
    logits, hidden = runner.draft_forward(_with_static_host_lens(static), static_hidden)
    torch.testing.assert_close(logits[: 2 * k], eager_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden[: 2 * k], eager_hidden, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_padded_extend_batch_gives_real_rows(tiny_model_dir: Path) -> None:
    """The fixed-shape draft extend (2 requests x 4 causal queries, one logit row each: accepted 0 and 3
    drafts) padded to a bucket of 4: the real rows' top-k and hidden equal the unpadded forward's; a
    padded sequence reads its own last query."""
    lens, pages = [5, 11], [[1, 2, 3], [4, 5, 6, 7]]
    runner = _prefilled_runner(tiny_model_dir, lens, pages)
    w, k = 4, 2
    layout = TreeLayout.build(lens, pages, w, PAGE)
    tokens = torch.tensor([[17, 0, 0, 0], [5, 9, 11, 13]])
    causal = torch.ones(w, w, dtype=torch.bool).tril().expand(2, w, w)
    rows = torch.tensor([0, w + 3])
    batch = ForwardBatch.tree_in(layout, tokens, torch.arange(w).expand(2, w), causal, logit_rows=rows)
    hidden_in = torch.randn(2 * w, runner.config.hidden_size, generator=torch.Generator().manual_seed(5))
    eager = [t.clone() for t in runner.draft_extend_forward(batch, hidden_in, k)]  # no graphs on CPU: eager
    assert [tuple(t.shape) for t in eager] == [(2, k), (2, k), (2, runner.config.hidden_size)]
    g = GraphRunner(lambda b, h: runner.draft_topk_forward(b, h, k), [4], 5, PAGE, "cpu", queries=w, window=w,
                    hidden_size=runner.config.hidden_size, hidden_dtype=torch.float32, outputs_per_seq=True)
    static, static_hidden = g._static_batch(4), g._static_hidden(4)
    static.logit_rows.fill_(0)  # leftovers of an earlier step
    g.load(static, static_hidden, batch, hidden_in)
    assert static.logit_rows.tolist() == [0, w + 3, 2 * w + 3, 3 * w + 3]
    out = runner.draft_topk_forward(_with_static_host_lens(static), static_hidden, k)
    assert torch.equal(out[1][:2], eager[1])
    for got, want in zip(out, eager):
        torch.testing.assert_close(got[:2], want, rtol=1e-5, atol=1e-5)


@torch.inference_mode()
def test_runner_replays_the_fitting_graph_else_runs_eagerly(tiny_model_dir: Path) -> None:
    """ModelRunner's one graph-or-eager choice, with stand-in graphs (a CPU has no CUDA graphs; bucket 2 is
    marked captured and `run` is recorded): each forward replays the runner of its own kind and window
    with the batch and its hidden input; a batch that no captured bucket holds, or a kind without graphs,
    runs the eager function, which gives forward()'s / draft_forward()'s results."""
    lens, pages = [5, 11, 2], [[1, 2, 3], [4, 5, 6, 7], [8, 9]]
    runner = _prefilled_runner(tiny_model_dir, lens, pages)
    hidden_size, replays = runner.config.hidden_size, []

    def stand_in(queries: int, window: int, **shape: object) -> GraphRunner:
        g = GraphRunner(lambda *_: None, [2], 6, PAGE, "cpu", queries=queries, window=window, **shape)
        g.graphs[2] = None  # type: ignore[assignment]
        g.run = lambda batch, hidden=None: replays.append((g, batch, hidden)) or "replayed"  # type: ignore
        return g

    n, k, w = 4, 2, 4
    verify, extend = stand_in(n, n), stand_in(w, w, hidden_size=hidden_size, outputs_per_seq=True)
    levels = [stand_in(k, (lv + 1) * k, hidden_size=hidden_size) for lv in range(2)]
    runner.graphs = {Forward.VERIFY: GraphSet([verify]), Forward.DRAFT_STEP: GraphSet(levels),
                     Forward.DRAFT_EXTEND: GraphSet([extend])}
    gen = torch.Generator().manual_seed(6)
    tree = ForwardBatch.tree(*_tree(2, n, n, seed=6), lens[:2], pages[:2], PAGE)
    level1 = ForwardBatch.tree(*_tree(2, k, 2 * k, seed=7), lens[:2], pages[:2], PAGE)
    hid = torch.randn(2 * k, hidden_size, generator=gen)
    layout = TreeLayout.build(lens[:2], pages[:2], w, PAGE)
    causal = torch.ones(w, w, dtype=torch.bool).tril().expand(2, w, w)
    ext = ForwardBatch.tree_in(layout, torch.full((2, w), 7), torch.arange(w).expand(2, w), causal,
                               logit_rows=torch.tensor([0, w + 1]))
    ext_hid = torch.randn(2 * w, hidden_size, generator=gen)
    assert runner.verify_forward(tree) == "replayed" and replays[-1] == (verify, tree, None)
    assert runner.draft_step_forward(level1, hid) == "replayed" and replays[-1] == (levels[1], level1, hid)
    assert runner.draft_extend_forward(ext, ext_hid, k) == "replayed"
    assert replays[-1] == (extend, ext, ext_hid)
    assert len(replays) == 3
    # no decode graphs: eager
    plain = ForwardBatch.decode([7, 8], lens[:2], pages[:2], PAGE)
    torch.testing.assert_close(runner.decode_logits(plain), runner.forward(plain)[0], rtol=1e-5, atol=1e-5)
    # 3 sequences: no captured bucket holds them, eager
    tree3 = ForwardBatch.tree(*_tree(3, n, n, seed=8), lens, pages, PAGE)
    got = [t.clone() for t in runner.verify_forward(tree3)]
    for a, b in zip(got, runner.forward(tree3)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    level0 = ForwardBatch.tree(*_tree(3, k, k, seed=9), lens, pages, PAGE)
    hid3 = torch.randn(3 * k, hidden_size, generator=gen)
    got = [t.clone() for t in runner.draft_step_forward(level0, hid3)]
    for a, b in zip(got, runner.draft_forward(level0, hid3)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert len(replays) == 3
    runner.release_graphs()
    assert runner.graphs == {} and not verify.graphs and not any(lv.graphs for lv in levels)
    assert isinstance(runner.verify_forward(tree), tuple) and len(replays) == 3
    with pytest.raises(RuntimeError):
        runner.capture_decode_graphs(2)  # no graph-safe attention on a CPU
    assert runner.graphs == {}

