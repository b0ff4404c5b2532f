"""torch_ref paged attention vs dense masked SDPA on the same K/V laid out contiguously."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from common.attention import paged_attention, torch_ref
from common.forward.batch import ForwardBatch, SeqSpec

HQ, HK, D = 4, 2, 16


def _setup(specs: list[dict], page_size: int, seed: int = 0):
    """Random K/V for every logical slot of every sequence, written to shuffled pages."""
    gen = torch.Generator().manual_seed(seed)
    num_pages = 1 + sum(-(-s["seq_len"] // page_size) for s in specs)
    free = list(range(1, num_pages))
    random.Random(seed).shuffle(free)
    k_cache = torch.zeros(num_pages, page_size, HK, D)
    v_cache = torch.zeros(num_pages, page_size, HK, D)
    seqs, dense = [], []
    for s in specs:
        n, q = s["seq_len"], s["q"]
        pages = [free.pop() for _ in range(-(-n // page_size))]
        k = torch.randn(n, HK, D, generator=gen)
        v = torch.randn(n, HK, D, generator=gen)
        for i in range(n):
            k_cache[pages[i // page_size], i % page_size] = k[i]
            v_cache[pages[i // page_size], i % page_size] = v[i]
        seqs.append(SeqSpec(list(range(q)), list(range(n - q, n)), n, pages,
                            prefix_len=s.get("prefix"), mask=s.get("mask")))
        dense.append((k, v))
    batch = ForwardBatch.build(seqs, page_size)
    q = torch.randn(batch.num_tokens, HQ, D, generator=gen)
    return q, k_cache, v_cache, batch, dense


def _dense_reference(q, batch, dense, scale):
    out = []
    start = 0
    for b, (k, v) in enumerate(dense):
        n_q, n, prefix = batch.query_lens_host[b], batch.seq_lens_host[b], batch.prefix_lens_host[b]
        allowed = torch.zeros(n_q, n, dtype=torch.bool)
        allowed[:, :prefix] = True
        if batch.mask is None:
            for i in range(n_q):
                allowed[i, prefix : n - n_q + i + 1] = True
        else:
            m0 = int(batch.mask_start[b])
            allowed[:, prefix:] = batch.mask[m0 : m0 + n_q * (n - prefix)].view(n_q, n - prefix)
        qb = q[start : start + n_q].transpose(0, 1)  # [HQ,n_q,D]
        kb = k.transpose(0, 1).repeat_interleave(HQ // HK, dim=0)  # [HQ,n,D]
        vb = v.transpose(0, 1).repeat_interleave(HQ // HK, dim=0)
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed, scale=scale)
        out.append(o.transpose(0, 1))
        start += n_q
    return torch.cat(out)


CASES = {
    "causal_prefill": [{"seq_len": 13, "q": 13}],
    "prefix_then_chunk": [{"seq_len": 21, "q": 6}],
    "decode_batch": [{"seq_len": 5, "q": 1}, {"seq_len": 17, "q": 1}, {"seq_len": 1, "q": 1}],
    "mixed_batch": [{"seq_len": 9, "q": 9}, {"seq_len": 12, "q": 1}, {"seq_len": 30, "q": 7}],
    "partial_prefix": [{"seq_len": 14, "q": 3, "prefix": 8}],  # window [8,14) causal for the last 3
}


@pytest.mark.parametrize("page_size", [1, 4, 16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_dense_sdpa(case: str, page_size: int) -> None:
    q, kc, vc, batch, dense = _setup(CASES[case], page_size)
    scale = D**-0.5
    got = torch_ref.paged_attention(q, kc, vc, batch, scale)
    want = _dense_reference(q, batch, dense, scale)
    assert got.shape == (batch.num_tokens, HQ, D)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _tree_mask() -> torch.Tensor:
    # nodes 0..4 after a 6-slot prefix; parents: 0 <- root, 1 <- 0, 2 <- 0, 3 <- 1, 4 <- 2
    parents = [-1, 0, 0, 1, 2]
    m = torch.zeros(5, 5, dtype=torch.bool)
    for i in range(5):
        j = i
        while j >= 0:
            m[i, j] = True
            j = parents[j]
    return m


@pytest.mark.parametrize("page_size", [1, 4])
def test_tree_mask_with_prefix_and_causal_neighbour(page_size: int) -> None:
    specs = [{"seq_len": 11, "q": 5, "mask": _tree_mask()}, {"seq_len": 8, "q": 2}]
    q, kc, vc, batch, dense = _setup(specs, page_size, seed=1)
    assert batch.mask is not None  # the causal neighbour gets a causal block
    got = paged_attention(q, kc, vc, batch, 0.3)
    want = _dense_reference(q, batch, dense, 0.3)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the tree really changes the answer: a causal run differs on the non-chain nodes
    causal = ForwardBatch.build([SeqSpec(list(range(5)), list(range(6, 11)), 11, list(batch.page_table[0].tolist()))],
                                page_size)
    diff = torch_ref.paged_attention(q[:5], kc, vc, causal, 0.3) - got[:5]
    assert diff[2:].abs().max() > 1e-3 and diff[:2].abs().max() < 1e-6


def test_bf16_close_to_fp32() -> None:
    q, kc, vc, batch, dense = _setup(CASES["mixed_batch"], 4, seed=2)
    got = paged_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), batch, D**-0.5)
    assert got.dtype == torch.bfloat16
    want = _dense_reference(q, batch, dense, D**-0.5)
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)
