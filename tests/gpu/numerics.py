"""Shared numerics helpers of the GPU tests."""

from __future__ import annotations

import pytest
import torch


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; a non-finite output fails."""
    assert torch.isfinite(out).all(), "non-finite output"
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.fixture(autouse=True)
def fresh_seed() -> None:
    """Fresh random inputs for every test (a fast path must hold on any valid input)."""
    torch.manual_seed(torch.seed())
