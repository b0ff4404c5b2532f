from __future__ import annotations

import pytest

from common.kvcache.allocator import PageAllocator


def test_page_zero_reserved_and_counts() -> None:
    alloc = PageAllocator(9)
    assert alloc.num_total == 8 and alloc.num_free == 8
    pages = alloc.alloc(8)
    assert pages is not None and sorted(pages) == list(range(1, 9))
    assert 0 not in pages
    assert alloc.num_free == 0 and alloc.alloc(1) is None


def test_alloc_is_all_or_nothing() -> None:
    alloc = PageAllocator(5)
    assert alloc.alloc(5) is None  # only 4 usable pages
    assert alloc.num_free == 4
    got = alloc.alloc(3)
    assert got is not None and len(set(got)) == 3
    assert alloc.alloc(2) is None and alloc.num_free == 1
    assert alloc.alloc(0) == []


def test_free_returns_pages_and_they_are_reused() -> None:
    alloc = PageAllocator(6)
    a = alloc.alloc(2)
    b = alloc.alloc(3)
    assert a is not None and b is not None and not set(a) & set(b)
    alloc.free(a)
    assert alloc.num_free == 2
    c = alloc.alloc(2)
    assert c is not None and set(c) == set(a)
    alloc.free(b)
    alloc.free(c)
    assert alloc.num_free == alloc.num_total == 5 and alloc.num_used == 0


@pytest.mark.parametrize("bad", [[0], [3, 3], [7], [99]])
def test_bad_free_raises_and_changes_nothing(bad: list[int]) -> None:
    alloc = PageAllocator(8)
    held = alloc.alloc(3)
    assert held == [1, 2, 3]
    before = alloc.num_free
    with pytest.raises(ValueError):
        alloc.free(bad)
    assert alloc.num_free == before and alloc.num_used == 3


def test_double_free_raises() -> None:
    alloc = PageAllocator(4)
    pages = alloc.alloc(2)
    assert pages is not None
    alloc.free(pages)
    with pytest.raises(ValueError, match="not allocated"):
        alloc.free(pages[:1])
    assert alloc.num_free == 3


def test_rejects_tiny_pool_and_negative_alloc() -> None:
    with pytest.raises(ValueError):
        PageAllocator(1)
    with pytest.raises(ValueError):
        PageAllocator(3).alloc(-1)
