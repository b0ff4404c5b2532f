"""The paged attention's launch plan for small-query batches (decode, draft, verify): the tiles the
H100 sweep chose, split-K only while the batch has fewer programs than the GPU has SMs."""

from __future__ import annotations

import pytest

from common.attention.triton_paged import VERIFY_ROWS16_MAX, plan

SMS = 132  # H100 SXM


@pytest.mark.parametrize("seqs", [1, 8, 16, 32, 64, 256])
def test_decode_rows_take_one_16_row_block_and_split_only_an_underfilled_grid(seqs: int) -> None:
    bm, bn, warps, stages, splits = plan(seqs, 8, 12, 1, SMS)
    assert (bm, bn, warps, stages) == (16, 64, 4, 2)
    programs = seqs * 8
    assert splits == (1 if programs >= SMS else min(64, -(-2 * SMS // programs)))


def test_verify_rows_take_16_row_blocks_up_to_the_threshold_then_one_block() -> None:
    assert plan(VERIFY_ROWS16_MAX, 8, 12, 4, SMS)[:4] == (16, 128, 4, 3)
    assert plan(VERIFY_ROWS16_MAX + 1, 8, 12, 4, SMS)[:4] == (64, 32, 4, 3)
    # one sequence: 3 row blocks x 8 KV heads = 24 programs, split 11 ways (two waves of SMs' programs)
    assert plan(1, 8, 12, 4, SMS) == (16, 128, 4, 3, 11)
    assert plan(64, 8, 12, 4, SMS)[4] == 1


def test_splits_never_exceed_the_cap_and_extend_keeps_its_tile() -> None:
    assert plan(1, 1, 12, 1, SMS)[4] == 64
    assert plan(1, 8, 12, 2048, SMS) == (128, 128, 8, 3, 1)
