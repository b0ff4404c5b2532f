"""PageAllocator: hands out KV-cache pages and takes them back (pure Python, no torch).

Page 0 is reserved as the dummy page (padding rows of a batch write there) and is never handed
out, so `num_total == num_pages - 1`. `alloc` is all-or-nothing; `free` validates the whole list
before releasing anything, so a bad call (double free, foreign page) changes no state.
"""

from __future__ import annotations

from collections.abc import Iterable


class PageAllocator:
    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError(f"num_pages must be >= 2 (page 0 is reserved), got {num_pages}")
        self._num_pages = num_pages
        # pop() from the end hands out low page numbers first; freed pages are reused first
        self._free: list[int] = list(range(num_pages - 1, 0, -1))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_total(self) -> int:
        """Pages that can ever be handed out (page 0 excluded)."""
        return self._num_pages - 1

    @property
    def num_used(self) -> int:
        return len(self._used)

    def alloc(self, n: int) -> list[int] | None:
        """n distinct pages, or None (taking nothing) when fewer than n are free."""
        if n < 0:
            raise ValueError(f"cannot allocate a negative number of pages ({n})")
        if n > len(self._free):
            return None
        if n == 0:
            return []
        pages = self._free[:-n - 1:-1]  # the last n, last first: what n pops would give
        del self._free[-n:]
        self._used.update(pages)
        return pages

    def holds(self, page: int) -> bool:
        """Whether `page` is handed out."""
        return page in self._used

    def free(self, pages: Iterable[int]) -> None:
        """Give pages back. Raises ValueError, freeing nothing, if any page is not currently held."""
        pages = [int(p) for p in pages]
        distinct = set(pages)
        if len(distinct) != len(pages) or not distinct <= self._used:  # checked in C; the loop only names the page
            seen: set[int] = set()
            for p in pages:
                if p == 0:
                    raise ValueError("page 0 is the reserved dummy page and is never allocated")
                if p in seen or p not in self._used:
                    raise ValueError(f"page {p} is not allocated (double free or foreign page)")
                seen.add(p)
        self._used.difference_update(distinct)
        self._free.extend(reversed(pages))

    def __repr__(self) -> str:
        return f"PageAllocator(free={self.num_free}/{self.num_total})"
