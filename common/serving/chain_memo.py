"""ChainMemo: recent prompts' page keys (common/serving/page_hash.py chains), reused for the pages
a new prompt shares with one of them. Torch-free: the gateway and the workers use it.

A chain is named by a tuple whose second item is its page size in tokens: (namespace, page size,
salt) on the gateway, (root key, page size) on a worker.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable


class ChainMemo:
    """The page keys of recent prompts, so that a prompt extending one of them (the next turn of a
    conversation or an agent loop resends the whole history) hashes only its new pages: the
    gateway's routing lookups and the workers' prefix-cache matches both chain every page of a long
    cached prompt.

    An entry is a prompt's tokens, packed as page_hash.pack does, and the keys computed for it under
    one chain (see the module doc), found by the key of its first page; the pages it shares
    with a new prompt are found by comparing the packed tokens, so a reused key always belongs to the
    same tokens. Sessions that share a system prompt share a first page: an entry the new prompt
    extends whole is found by comparing one page at the entry's end, and only the two most recent
    entries are bisected for a partial match. At most `per_head` entries per first page (the most
    recent), `max_tokens` in all (least recently stored dropped first)."""

    def __init__(self, max_tokens: int = 1 << 23, per_head: int = 16) -> None:
        self.max_tokens = max_tokens
        self.per_head = per_head
        self._heads: OrderedDict[tuple, list[tuple[bytes, list[bytes]]]] = OrderedDict()
        self._tokens = 0

    def reuse(self, chain_id: tuple, first: bytes, packed: Callable[[], bytes],
              pages: int) -> list[bytes]:
        """Keys of the longest run of leading pages (at most `pages`) of a prompt that an entry under
        the same chain and first-page key (`first`) shares; `packed()` gives the prompt's packed
        tokens, asked for only when there is an entry to compare with."""
        entries = self._heads.get((*chain_id, first))
        if not entries:
            return []
        raw, step = packed(), 4 * chain_id[1]
        best: list[bytes] = []
        for old_raw, old_keys in entries:  # one the prompt extends whole: the longest such
            n = min(pages, len(old_keys))
            if n > len(best) and raw[(n - 1) * step:n * step] == old_raw[(n - 1) * step:n * step] \
                    and raw[:n * step] == old_raw[:n * step]:
                best = old_keys[:n]
        if best:
            return best
        for old_raw, old_keys in entries[:2]:  # else the longest common part of the latest two
            n = common_pages(raw, old_raw, step, min(pages, len(old_keys)))
            if n > len(best):
                best = old_keys[:n]
        return best

    def store(self, chain_id: tuple, raw: bytes, keys: list[bytes]) -> None:
        """Remember `keys`, the leading pages' keys of the packed prompt `raw` under `chain_id`."""
        if len(keys) < 2:
            return  # one page is one hash: nothing worth keeping
        head = (*chain_id, keys[0])
        raw = raw[:len(keys) * 4 * chain_id[1]]
        kept, dropped = [], []
        for entry in self._heads.pop(head, []):  # an entry this one extends (a job's earlier chunk) goes
            (dropped if raw.startswith(entry[0]) else kept).append(entry)
        entries = [(raw, list(keys)), *kept]  # a copy of keys: the caller's list may grow
        dropped += entries[self.per_head:]
        for old_raw, _ in dropped:
            self._tokens -= len(old_raw) // 4
        del entries[self.per_head:]
        self._heads[head] = entries
        self._tokens += len(entries[0][0]) // 4
        while self._tokens > self.max_tokens and self._heads:
            _, old = self._heads.popitem(last=False)
            self._tokens -= sum(len(r) // 4 for r, _ in old)


def common_pages(a: bytes, b: bytes, step: int, limit: int) -> int:
    """How many leading `step`-byte pages a and b share, at most `limit`: one comparison when the
    whole range is equal (a conversation's next turn), else a bisection that compares each byte at
    most twice."""
    if a[:limit * step] == b[:limit * step]:  # bytes slices: a copy and a memcmp (a memoryview compares per item)
        return limit
    lo, hi = 0, limit  # pages [0, lo) equal; some page in [lo, hi) differs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo * step:mid * step] == b[lo * step:mid * step]:
            lo = mid
        else:
            hi = mid
    return lo  # [lo, lo + 1) holds a differing page


__all__ = ["ChainMemo", "common_pages"]
