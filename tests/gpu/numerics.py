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


def assert_clear_argmax_equal(out: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    """Greedy choices agree wherever they cannot flip: a row whose top-2 margin in `ref` exceeds twice
    its largest |out - ref| must pick the same token (random-weight logits have near-ties elsewhere,
    where an argmax comparison would test only noise). A quarter of the rows must be clear, so this cannot pass
    vacuously."""
    out, ref = out.float(), ref.float()
    top2 = ref.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * (out - ref).abs().amax(-1)
    assert clear.float().mean() >= 0.25, f"{what}: only {int(clear.sum())} of {clear.numel()} rows are clear"
    assert torch.equal(out.argmax(-1)[clear], ref.argmax(-1)[clear]), f"{what}: a clear greedy choice differs"


def assert_prefetch_equals_plain(step, refresh, budget_mb: int, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                 replays: int = 10) -> None:
    """step() under programmatic dependent launch with a weight-prefetch budget of budget_mb equals
    plain launches bit for bit: eagerly, and as a CUDA graph replayed after each refresh() of its inputs."""
    from common.ops import pdl

    monkeypatch.setattr(pdl, "ENABLED", False)
    want = step()
    monkeypatch.setattr(pdl, "ENABLED", True)
    monkeypatch.setattr(pdl, "PREFETCH_BYTES", budget_mb * 10**6)
    assert torch.equal(step(), want)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    monkeypatch.setattr(pdl, "ENABLED", False)
    for _ in range(replays):
        refresh()
        want = step()
        graph.replay()
        assert torch.equal(out, want)
