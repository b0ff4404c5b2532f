"""--load-format dummy on the GPU: the CUDA generator's draws, quantised by the Triton FP8 quantiser,
still make every TP rank's weights its slice of the TP 1 virtual checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.common.test_dummy_load import check_dummy_is_the_virtual_checkpoint


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["none", "fp8-channel", "fp8-block"])
def test_dummy_on_cuda_is_the_virtual_checkpoint(tmp_path: Path, quantization: str) -> None:
    check_dummy_is_the_virtual_checkpoint(tmp_path, quantization, "cuda")
