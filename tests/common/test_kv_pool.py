from __future__ import annotations

import pytest
import torch

from common.kvcache.pool import KVPool
from common.ops import reference


def _pool(page_size: int = 4) -> KVPool:
    return KVPool(num_layers=3, num_pages=6, page_size=page_size, kv_heads=2, head_dim=8,
                  dtype=torch.float32, device="cpu")


def test_layout_and_views() -> None:
    pool = _pool()
    assert pool.k[1].shape == (6, 4, 2, 8) and pool.k[1].is_contiguous()
    pool.k[2][3, 1] = 7.0
    assert pool.kv[2, 0, 3, 1].eq(7.0).all() and pool.v[2].eq(0).all()
    assert pool.bytes_per_token == 3 * 2 * 2 * 8 * 4


def test_slots_follow_page_table() -> None:
    pool = _pool()
    assert pool.slots([5, 2], 0, 6).tolist() == [20, 21, 22, 23, 8, 9]
    assert pool.slots([5, 2], 3, 2).tolist() == [23, 8]
    with pytest.raises(ValueError):
        pool.slots([5, 2], 6, 3)


def test_gather_matches_store_kv_and_scatter_roundtrips() -> None:
    pool = _pool()
    pages = [4, 1, 3]
    n = 10
    slots = pool.slots(pages, 0, n)
    ks = torch.randn(pool.num_layers, n, 2, 8)
    vs = torch.randn(pool.num_layers, n, 2, 8)
    for layer in range(pool.num_layers):
        reference.store_kv(pool.k[layer], pool.v[layer], ks[layer], vs[layer], slots)
    got = pool.gather_tokens(range(3), pages, n)
    assert got.shape == (3, 2, n, 2, 8)
    assert torch.equal(got[:, 0], ks) and torch.equal(got[:, 1], vs)
    # a sub-range of layers and tokens
    part = pool.gather_tokens((1, 3), pages, 4, token_start=5)
    assert torch.equal(part[:, 0], ks[1:3, 5:9])

    other = _pool()
    dst_pages = [2, 5, 1]
    other.scatter_tokens(range(3), dst_pages, 0, got[:, :, :6])
    other.scatter_tokens((0, 3), dst_pages, 6, got[:, :, 6:])
    assert torch.equal(other.gather_tokens(range(3), dst_pages, n), got)
    # nothing else was written
    written = torch.zeros(6 * 4, dtype=torch.bool)
    written[other.slots(dst_pages, 0, n)] = True
    flat = other.kv.view(3, 2, 24, 2, 8)
    assert flat[:, :, ~written].eq(0).all()


def test_scatter_rejects_wrong_shape_and_layers() -> None:
    pool = _pool()
    with pytest.raises(ValueError):
        pool.scatter_tokens(range(2), [1, 2], 0, torch.zeros(3, 2, 4, 2, 8))
    with pytest.raises(ValueError):
        pool.gather_tokens((2, 4), [1], 1)


def test_copy_slots_all_layers_and_overlap() -> None:
    pool = _pool()
    pool.kv.copy_(torch.randn_like(pool.kv))
    before = pool.kv.clone().view(3, 2, 24, 2, 8)
    src = torch.tensor([5, 6, 7])
    dst = torch.tensor([6, 7, 8])  # overlapping: must read all sources first
    pool.copy_slots(src, dst)
    after = pool.kv.view(3, 2, 24, 2, 8)
    assert torch.equal(after[:, :, [6, 7, 8]], before[:, :, [5, 6, 7]])
    assert torch.equal(after[:, :, 5], before[:, :, 5])
    keep = [i for i in range(24) if i not in (6, 7, 8)]
    assert torch.equal(after[:, :, keep], before[:, :, keep])
