"""o_proj's weight prefetched on a side stream beside a few tokens' attention
(common/ops/triton_prefetch.py): which bytes a budget covers, when it forks at all, and that its
kernel, compiled for sm_90 on the CPU, only asks L2 for lines (no load, no store). The GPU tests
(tests/gpu/test_decode_graphs_gpu.py, tests/gpu/test_eagle_graphs_gpu.py) replay graphs captured with
it and compare tokens with the eager forward without it."""

from __future__ import annotations

import pytest
import torch

from common import ops
from common.ops import triton_prefetch as tp
from common.ops.compile_report import compile_sm90


@pytest.mark.parametrize("rows, row_bytes, budget, lo", [
    (4096, 12288, 24_000_000, 12288 - 5760),  # Air's o_proj in FP8: 5859 bytes a row, whole lines: 45 of them
    (4096, 12288, 60_000_000, 0),  # more than the weight: every row whole
    (4096, 12288, 1000, 12288 - 128),  # less than a line a row: one line each
    (5120, 24576, 40_000_000, 24576 - 7808),  # GLM-4.5's o_proj in bf16 (bytes)
])
def test_tail_columns_take_whole_lines_from_the_end_within_the_budget(rows: int, row_bytes: int, budget: int,
                                                                      lo: int) -> None:
    got_lo, hi = tp.tail_columns(rows, row_bytes, budget)
    assert (got_lo, hi) == (lo, row_bytes)
    width = hi - got_lo
    assert width % 128 == 0 or got_lo == 0
    assert rows * width <= max(budget, rows * 128) or got_lo == 0


def test_nothing_forks_without_a_budget_or_for_a_long_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    w = torch.empty(64, 256, dtype=torch.uint8)  # a CPU tensor: reaching the fork would fail on torch.cuda
    monkeypatch.setattr(tp, "AHEAD_BYTES", 0)
    tp.prefetch_ahead(w, 1)
    monkeypatch.setattr(tp, "AHEAD_BYTES", 1 << 20)
    tp.prefetch_ahead(w, tp.AHEAD_MAX_TOKENS + 1)
    tp.prefetch_ahead(w.t(), 1)  # not row-major
    assert not tp._pending


def test_the_torch_twins_do_nothing() -> None:
    w = torch.randn(8, 16)
    before = w.clone()
    assert ops.prefetch_ahead(w, 1) is None and ops.join_ahead(w.device) is None
    assert torch.equal(w, before)


def test_kernel_only_prefetches() -> None:
    sig = {"w_ptr": "*u8", "n_rows": "i32", "row_stride": "i32", "k_lo": "i32", "k_hi": "i32"}
    ptx = compile_sm90(tp._prefetch_tail_kernel, sig, {"ROWS": 64}, ("w_ptr",)).asm["ptx"]
    lines = [line.strip() for line in ptx.splitlines()]
    assert any(line.startswith("prefetch.global.L2") for line in lines)
    touching = [line for line in lines if line.startswith(("ld.global", "st.global", "atom.", "red.", "cp.async"))]
    assert not touching, f"the prefetch kernel reads or writes memory: {touching}"
