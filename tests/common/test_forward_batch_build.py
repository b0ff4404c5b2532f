"""ForwardBatch.build against the batch written out token by token (its module docstring): ids,
positions, slots through the page table, lengths, logit rows, the page table, consecutive-page runs
and masks, for short and long (torch-computed slots) sequences on shuffled and consecutive pages."""

from __future__ import annotations

import random

import pytest
import torch

from common.forward.batch import ForwardBatch, SeqSpec

PAGE = 16


def _spec(rng: random.Random, q: int, prefix: int, pages: list[int], mask: bool) -> SeqSpec:
    seq_len = prefix + q
    need = -(-seq_len // PAGE)
    m = torch.rand(q, q, generator=torch.Generator().manual_seed(q)) > 0.5 if mask else None
    rows = sorted(rng.sample(range(q), min(q, 3))) if q > 3 else None
    return SeqSpec([rng.randrange(1000) for _ in range(q)], range(prefix, seq_len), seq_len, pages[:need + 1],
                   prefix_len=prefix if mask else None, mask=m, logit_rows=rows)


@pytest.mark.parametrize("masked", [False, True])
def test_build_matches_token_by_token(masked: bool) -> None:
    rng = random.Random(3)
    free = list(range(1, 400))
    rng.shuffle(free)
    shapes = [(1, 37), (5, 0), (300, 21), (257, 256), (1000, 3)]  # (q, prefix): short runs and long ones
    seqs = []
    for i, (q, prefix) in enumerate(shapes):
        n = -(-(q + prefix) // PAGE) + 1
        pages = list(range(200 + 0, 200 + n)) if i == 2 else [free.pop() for _ in range(n)]  # one consecutive run
        seqs.append(_spec(rng, q, prefix, pages, masked))
    b = ForwardBatch.build(seqs, PAGE)

    ids, pos, slots, rows, qstart = [], [], [], [], [0]
    for s in seqs:
        q = len(s.input_ids)
        rows += [len(ids) + r for r in (s.logit_rows if s.logit_rows is not None else [q - 1])]
        ids += s.input_ids
        pos += list(s.positions)
        slots += [s.pages[lg // PAGE] * PAGE + lg % PAGE for lg in range(s.seq_len - q, s.seq_len)]
        qstart.append(qstart[-1] + q)
    assert b.input_ids.tolist() == ids and b.input_ids.dtype == torch.int64
    assert b.positions.tolist() == pos and b.out_slots.tolist() == slots and b.out_slots.dtype == torch.int64
    assert b.logit_rows.tolist() == rows
    assert b.query_start.tolist() == qstart and b.query_start.dtype == torch.int32
    assert b.seq_lens.tolist() == [s.seq_len for s in seqs] and b.seq_lens.dtype == torch.int32
    prefix = [s.prefix_len if s.prefix_len is not None else s.seq_len - len(s.input_ids) for s in seqs]
    assert b.prefix_lens.tolist() == prefix and list(b.prefix_lens_host) == prefix
    width = max(len(s.pages) for s in seqs)
    assert b.page_table.tolist() == [list(s.pages) + [0] * (width - len(s.pages)) for s in seqs]
    assert b.page_table.dtype == torch.int32
    runs = []
    for s in seqs:
        used = list(s.pages[:-(-s.seq_len // PAGE)])
        runs.append(used[0] if used == list(range(used[0], used[0] + len(used))) else -1)
    assert b.run_start_host == tuple(runs) and runs[2] == 200 and runs[1] != -1 and runs[3] == -1
    if masked:
        assert b.mask is not None and b.mask_start is not None
        assert torch.equal(b.mask, torch.cat([s.mask.reshape(-1) for s in seqs]))
        assert b.mask_start.tolist() == [0] + list(torch.tensor([len(s.input_ids) ** 2 for s in seqs]).cumsum(0))
    else:
        assert b.mask is None


def test_build_takes_tensor_ids_and_rejects_short_pages() -> None:
    spec = SeqSpec(torch.tensor([4, 5, 6]), torch.arange(10, 13), 13, [3])
    b = ForwardBatch.build([spec], PAGE)
    assert b.input_ids.tolist() == [4, 5, 6] and b.positions.tolist() == [10, 11, 12]
    assert b.out_slots.tolist() == [58, 59, 60] and b.run_start_host == (3,)
    with pytest.raises(ValueError, match="pages cannot hold"):
        ForwardBatch.build([SeqSpec(list(range(20)), range(20), 20, [3])], PAGE)
