"""The SDPA path of long prefills (common/attention/triton_paged.py: sdpa_prefill), on the CPU: torch's
CPU flash kernel takes the same call, so the page gather, the causal alignment after a cached prefix,
GQA, several sequences in one batch and the fallback rules are checked here against the reference
attention; tests/gpu/test_kernels_gpu.py runs the same path on cuDNN / flash against the Triton kernel.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from common.attention import torch_ref
from common.attention import triton_paged as tp
from common.forward.batch import ForwardBatch, SeqSpec

HQ, HK, D, PAGE = 8, 2, 32, 16


def _batch(specs: list[tuple[int, int]], masked: bool = False, in_order: bool = False) -> tuple[torch.Tensor, ...]:
    """(q, k_cache, v_cache, batch) for sequences of (new tokens, sequence length) on scrambled pages
    (in_order: each sequence on consecutive pages)."""
    gen = torch.Generator().manual_seed(3)
    need = sum(-(-s // PAGE) for _, s in specs)
    perm = (torch.arange(need) if in_order else torch.randperm(need, generator=gen)) + 1
    perm = perm.tolist()
    seqs, used = [], 0
    for q_len, seq_len in specs:
        n = -(-seq_len // PAGE)
        mask = torch.ones(q_len, q_len, dtype=torch.bool).tril() if masked else None
        seqs.append(SeqSpec([1] * q_len, list(range(seq_len - q_len, seq_len)), seq_len, perm[used:used + n],
                            prefix_len=seq_len - q_len, mask=mask))
        used += n
    batch = ForwardBatch.build(seqs, PAGE, "cpu")
    kc = torch.randn(need + 1, PAGE, HK, D, generator=gen, dtype=torch.float32).bfloat16()
    vc = torch.randn(need + 1, PAGE, HK, D, generator=gen, dtype=torch.float32).bfloat16()
    q = torch.randn(batch.num_tokens, HQ, D, generator=gen, dtype=torch.float32).bfloat16()
    return q, kc, vc, batch


def _rel(out: torch.Tensor, want: torch.Tensor) -> float:
    return float((out.float() - want).norm() / want.norm())


@pytest.fixture(autouse=True)
def _short_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tp, "SDPA_MIN_QUERY", 24)
    monkeypatch.setattr(tp, "USE_SDPA_PREFILL", True)
    monkeypatch.setattr(tp, "_sdpa_refused", set())


@pytest.mark.parametrize("specs", [[(40, 40)], [(30, 70)], [(40, 40), (24, 57), (33, 33)]],
                         ids=["one prompt", "after a cached prefix", "three sequences"])
def test_matches_the_reference_attention(specs: list[tuple[int, int]]) -> None:
    q, kc, vc, batch = _batch(specs)
    out = tp.sdpa_prefill(q, kc, vc, batch, D**-0.5)
    assert out is not None and out.shape == q.shape and out.dtype == q.dtype
    want = torch_ref.paged_attention(q.float(), kc.float(), vc.float(), batch, D**-0.5)
    assert _rel(out, want) < 1e-2


def test_consecutive_pages_are_read_in_place(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sequence whose pages are consecutive (a fresh prompt on a fresh pool) attends over a slice of
    the pool, without gathering its pages; scrambled pages are gathered. Same result either way."""
    gathers: list[int] = []
    index_select = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda t, *a: gathers.append(1) or index_select(t, *a))
    for in_order in (True, False):
        gathers.clear()
        q, kc, vc, batch = _batch([(40, 40), (24, 57)], in_order=in_order)
        assert (min(batch.run_start_host) >= 0) == in_order
        out = tp.sdpa_prefill(q, kc, vc, batch, D**-0.5)
        want = torch_ref.paged_attention(q.float(), kc.float(), vc.float(), batch, D**-0.5)
        assert out is not None and _rel(out, want) < 1e-2
        assert len(gathers) == (0 if in_order else 4)


def test_only_long_unmasked_prefills_take_it() -> None:
    q, kc, vc, batch = _batch([(40, 40), (8, 40)])  # one sequence below the threshold: the kernel's batch
    assert tp.sdpa_prefill(q, kc, vc, batch, D**-0.5) is None
    q, kc, vc, batch = _batch([(40, 40)], masked=True)  # a tree / verify mask: the kernel's
    assert tp.sdpa_prefill(q, kc, vc, batch, D**-0.5) is None
    tp.USE_SDPA_PREFILL = False
    q, kc, vc, batch = _batch([(40, 40)])
    assert tp.sdpa_prefill(q, kc, vc, batch, D**-0.5) is None


def test_a_refused_shape_falls_back_and_is_not_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    q, kc, vc, batch = _batch([(40, 40)])
    monkeypatch.setattr(tp, "_SDPA_BACKENDS", [SDPBackend.CUDNN_ATTENTION])  # not on the CPU: refused
    assert tp.sdpa_prefill(q, kc, vc, batch, D**-0.5) is None
    assert tp._sdpa_refused == {(True, torch.bfloat16, D, HQ // HK)}
    monkeypatch.setattr(tp, "_SDPA_BACKENDS", [SDPBackend.FLASH_ATTENTION])  # would work, but the shape is marked
    assert tp.sdpa_prefill(q, kc, vc, batch, D**-0.5) is None
    q2, kc2, vc2, batch2 = _batch([(30, 70)])  # another kind (a cached prefix) is still tried
    assert tp.sdpa_prefill(q2, kc2, vc2, batch2, D**-0.5) is not None
