"""The Triton token-bitmask kernel (common/ops/triton_bitmask.py) on the CPU interpreter against its
torch twin: bit-exact, in place, odd vocabulary sizes and several blocks per row."""

from __future__ import annotations

import os
import sys

import pytest

from tests.common.test_triton_interpret import run_interpreted

if not os.environ.get("CI"):  # in CI the dev extra installs triton: a missing one must fail
    pytest.importorskip("triton")


def test_bitmask_kernel_matches_the_twin_on_the_interpreter() -> None:
    run_interpreted(__file__, "bitmask", 120)


def _main() -> None:
    import torch

    from tests.common.test_triton_interpret import _setup

    _setup()
    import common.ops.triton_bitmask as tb
    from common.ops import reference

    tb._BLOCK = 64  # several programs per row even at these tiny sizes
    for rows, vocab in ((1, 1), (3, 31), (2, 33), (4, 200), (2, 257)):
        for dtype in (torch.float32, torch.float16):
            logits = torch.randn(rows, vocab).to(dtype)
            words = (vocab + 31) // 32
            bitmask = torch.randint(-2**31, 2**31 - 1, (rows, words), dtype=torch.int64).to(torch.int32)
            bitmask[0] = -1  # a row without a grammar
            want = reference.apply_token_bitmask(logits.clone(), bitmask)
            got = logits.clone()
            out = tb.apply_token_bitmask(got, bitmask)
            assert out is got, "in place"
            assert torch.equal(got, want), (rows, vocab, dtype)
            assert torch.equal(got[0], logits[0]), "an all-ones row is untouched"
    print("OK bitmask")


if __name__ == "__main__" and sys.argv[1:] == ["bitmask"]:
    _main()
